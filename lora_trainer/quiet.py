"""Library log lines that are noise for our runs, filtered at their source loggers (nothing else)."""

from __future__ import annotations

import logging
import warnings


class _EmptyFp32Warning(logging.Filter):
    """diffusers 0.42's `ModelMixin.to(dtype)` warns "There are modules in X that should be kept in
    float32: []" on every cast, also when the list is empty (its `or []` makes the None check always
    true). Our casts are the engine's own placement of modules that keep nothing in fp32; a real,
    non-empty list still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


class _TorchvisionFallback(logging.Filter):
    """transformers 5 warns "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" when diffusers' pipelines import their feature-extractor classes. We never
    use those processors (no safety checker, no image encoder), so installing torchvision would change
    nothing for the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("requires torchvision (not installed); falling back to" in text and "ImageProcessor" in text)


class _Bnb4bitCpuKernel(logging.Filter):
    """diffusers imports bitsandbytes whenever it is installed; bitsandbytes >= 0.49 then tries to fetch
    a CPU 4-bit matmul kernel from the Hub (through `kernels`) and warns when it cannot (offline, no
    trust). We never run bitsandbytes' 4-bit CPU matmul, so neither line tells the user anything."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("gemm_4bit_forward" in text or "kernels-community/quantization-bitsandbytes" in text)


_FILTERS: dict[str, logging.Filter] = {
    "diffusers.models.modeling_utils": _EmptyFp32Warning(),
    "transformers.utils.import_utils": _TorchvisionFallback(),
    "bitsandbytes.backends.cpu.ops": _Bnb4bitCpuKernel(),
    "kernels._internals.hf_hub": _Bnb4bitCpuKernel(),
}


def quiet_known_warnings() -> None:
    """Install the filters once (idempotent)."""
    # diffusers 0.36 decorates Kandinsky 5 methods with a CUDA autocast at import time; on a machine
    # without CUDA torch warns once per decorator. We never run Kandinsky, and the CPU is not an error.
    warnings.filterwarnings("ignore", message=r"CUDA is not available or torch_xla is imported\. Disabling autocast",
                            category=UserWarning, module=r"diffusers\.")
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
