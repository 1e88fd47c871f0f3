"""What accel's Triton kernels (group_norm_nhwc.py, geglu.py) share: whether Triton's interpreter runs them, and
their self-check, once per device and kind of call, that falls back to torch's math with one warning."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ..prefetch import in_background

log = logging.getLogger(__name__)
_lock = threading.Lock()  # one check at a time, so that an early one and a later ask of the same kind run it once


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the kernels on the CPU (tests)


def checked_once(results: dict, device: torch.device | str, key: tuple, what: str,
                 check: Callable[[torch.device], bool]) -> bool:
    """`check(device)` (compile, run and compare with torch's math) for (device, *key), remembered in `results`;
    False with a warning where it raises or disagrees (`what`: whose kernels, for the message). A first ask inside
    a CUDA-graph capture says False without checking (nothing compiles inside one) and is asked again later."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    full = (device, *key)
    if full not in results:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        with _lock:  # a check in flight on another thread (`check_early`): wait for its answer, not a second check
            if full not in results:
                results[full] = _run(check, device, key, what)
    return results[full]


def check_early(checks: list[Callable[[], object]]) -> Future:
    """Run `checks` (e.g. `lambda: geglu.check_kernels(device, dtype)`) in a thread now, so that importing Triton and
    compiling or loading the kernels happen beside the model's build and the caching (accel.options'
    `early_kernel_check`); a later ask finds the answer or waits for it. Wait for the future before a CUDA graph is
    captured: the checks launch kernels."""
    return in_background(lambda: [check() for check in checks], name="triton-check")


def _run(check: Callable[[torch.device], bool], device: torch.device, key: tuple, what: str) -> bool:
    try:
        with torch.inference_mode(False), torch.enable_grad():  # wherever it is first asked (e.g. in scoring)
            ok = bool(check(device))
    except Exception as e:  # noqa: BLE001 - whatever Triton raises here, torch's math is the answer
        log.warning("%s Triton kernels do not run on %s (%s: %s): torch's runs", what, device, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return False
    if not ok:
        log.warning("%s Triton kernels disagree with torch's on %s (%s): torch's runs", what, device, key[0])
    return ok
