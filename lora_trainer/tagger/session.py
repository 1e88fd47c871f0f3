"""onnxruntime session for a tagger: execution provider choice and what the graph says about itself."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, TaggerError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
PROVIDERS = {"cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
             "directml": "DmlExecutionProvider", "cpu": CPU}
AUTO_ORDER = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")


@dataclass(frozen=True)
class GraphInfo:
    input_name: str
    output_name: str
    size: int  # square input side (448 for the real taggers)
    batch: int | None  # fixed batch size of the export, None when the batch axis is dynamic
    outputs: int | None  # number of scores per image, when the graph says


def graph_info(session: object) -> GraphInfo:
    """Read names, input size and batch capability from the loaded graph (NHWC, 3 channels)."""
    inp = session.get_inputs()[0]  # type: ignore[attr-defined]
    out = session.get_outputs()[0]  # type: ignore[attr-defined]
    shape = list(inp.shape)
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
        raise TaggerError(f"The model's input {inp.name} has shape {shape}, not a WD14 tagger's "
                          "[batch, size, size, 3]; use a WD14 tagger (model.onnx from SmilingWolf's repos).")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    outputs = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
    return GraphInfo(inp.name, out.name, int(shape[1]), batch, outputs)


def open_session(model_path: str | os.PathLike[str], provider: str = "auto") -> tuple[object, str]:
    """An InferenceSession on the best working provider; returns (session, provider used).

    `provider`: auto (CUDA, ROCm or DirectML when onnxruntime offers one and it really runs,
    else CPU) or one of cuda/rocm/directml/cpu (a requested GPU provider that fails falls back
    to CPU with a warning, so a broken CUDA install never stops captioning).
    """
    import onnxruntime as ort

    if provider != "auto" and provider not in PROVIDERS:
        raise ConfigError(f"Provider '{provider}' is unknown; use auto, {', '.join(PROVIDERS)}.")
    available = ort.get_available_providers()
    wanted = AUTO_ORDER if provider == "auto" else (PROVIDERS[provider],)
    for name in wanted:
        if name == CPU:
            break
        if name not in available:
            if provider != "auto":
                log.warning("%s is not offered by this onnxruntime (%s); using the CPU", name, ", ".join(available))
            continue
        try:
            if name == "CUDAExecutionProvider":
                _preload_cuda_libraries(ort)
            session = _session(ort, model_path, [name, CPU])
            if session.get_providers()[0] != name:  # ORT quietly drops providers whose libraries are missing
                raise RuntimeError(f"{name} did not start (are its CUDA/cuDNN libraries installed?)")
            _smoke_test(session)
            return session, name
        except TaggerError:
            raise
        except Exception as e:  # noqa: BLE001 - any GPU failure: fall back to CPU, said aloud
            log.warning("%s failed (%s); using the CPU", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return _session(ort, model_path, [CPU]), CPU


_preloaded = False


def _preload_cuda_libraries(ort: object) -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN installed as pip packages (nvidia-*), once per process.

    onnxruntime ≥ 1.21 ships `preload_dlls` for this; without it a CUDA session quietly falls back to
    the CPU unless the libraries are on the loader's path (or torch, built for the same CUDA, loaded
    them first, as inside the WebUI).
    """
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)
    if _preloaded or preload is None:
        return
    _preloaded = True
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - best effort: the session start below says what is missing
        log.debug("onnxruntime.preload_dlls failed: %s", e)


def _session(ort: object, model_path: str | os.PathLike[str], providers: list[str]) -> object:
    try:
        return ort.InferenceSession(str(model_path), providers=providers)  # type: ignore[attr-defined]
    except Exception as e:  # ORT raises its own types (Fail, InvalidProtobuf, ...)
        if providers == [CPU]:
            raise TaggerError(f"{model_path} cannot be loaded by onnxruntime ({str(e).splitlines()[0][:200]}); "
                              "download model.onnx again.") from e
        raise


def _smoke_test(session: object) -> None:
    # A session can be created on a GPU whose kernels then fail (no cuDNN, out of memory): run once.
    info = graph_info(session)
    dummy = np.zeros((info.batch or 1, info.size, info.size, 3), dtype=np.float32)
    session.run([info.output_name], {info.input_name: dummy})  # type: ignore[attr-defined]
