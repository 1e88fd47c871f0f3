"""Which attention kernel `scaled_dot_product_attention` runs: cuDNN's fused attention first on Hopper.

PyTorch picks its attention backend by a fixed priority that puts FlashAttention 2 first and cuDNN last. On Hopper
GPUs (compute capability 9.x) cuDNN's fused attention is reported about 1.9x faster than the default at Flux's
attention shape (24 heads x 4608 tokens x 128, pytorch/pytorch#142132) and 1.7-2.3x for training shapes
(huggingface/transformers#48163, which prefers it on Hopper only). The order is only a preference: a shape cuDNN
cannot run (e.g. a head dimension above 128) falls back to the usual order. Off by default
(`AccelOptions.cudnn_attention`) until measured in our own runs: `bench/sdpa_backends.py` times each backend at
our shapes and checks a cuDNN step under a CUDA graph (a failed capture would turn the step runner's graphs off).

The backend flags are process-wide in PyTorch, so `preferred_attention` sets them for a run and restores what was
there before (a WebUI's own settings included); backends the host turned off stay off. Forge Neo makes the same
choice for its own generation on Windows (cuDNN first, `backend/operations.py`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


def cudnn_first_supported(device: torch.device | str) -> bool:
    """A Hopper GPU and a PyTorch whose `sdpa_kernel` takes a priority order (torch >= 2.6)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:  # torch < 2.3
        return False
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


@contextlib.contextmanager
def preferred_attention(device: torch.device | str, enabled: bool = True) -> Iterator[bool]:
    """Within: cuDNN attention first where `cudnn_first_supported`, else nothing changes. Yields whether it did."""
    if not enabled or not cudnn_first_supported(device):
        yield False
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    if not cuda.cudnn_sdp_enabled():  # turned off by the host or the user: respected
        yield False
        return
    # the backends enabled now, cuDNN first (a host's disabled backends stay disabled)
    order = [SDPBackend.CUDNN_ATTENTION] + [b for b, on in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                                                            (SDPBackend.EFFICIENT_ATTENTION,
                                                             cuda.mem_efficient_sdp_enabled()),
                                                            (SDPBackend.MATH, cuda.math_sdp_enabled())) if on]
    # sdpa_kernel restores the enabled flags, but moves a disabled backend to the end of the order: keep the
    # host's whole order as it was
    prior = list(torch._C._get_sdp_priority_order())
    try:
        with sdpa_kernel(order, set_priority=True):
            log.info("attention: cuDNN fused attention first (Hopper)")
            yield True
    finally:
        torch._C._set_sdp_priority_order(prior)
