"""Frozen base weights kept in the form they are stored in (fp8, nf4, GGUF, ...), dequantised on demand.

A `FrozenWeight` is one Linear layer's weight as its owner keeps it: the bytes are never changed,
copied or cast in place. `dequantize(dtype, device)` returns a temporary full-precision copy for one
matrix product; `QuantLinear` (linear.py) calls it in forward and again in backward, so at most one
layer's dequantised weight exists at a time (QLoRA-style training over a quantised base).

Formats:
- `PlainWeight`: fp32/fp16/bf16 (used where a host keeps some layers on another device).
- `Fp8Weight`: float8 e4m3fn/e5m2, with an optional scale: none (plain fp8), one number ("fp8_scaled",
  Comfy/Forge/Neo `scale_weight`) or one per output row (accel's fp8 base).
- `Nf4Weight`: bitsandbytes 4-bit (nf4/fp4) with its QuantState; needs bitsandbytes.
- `GGUFWeight`: raw GGUF blocks dequantised with the `gguf` package (numpy, on the CPU): the reference
  implementation, for files and tests; a WebUI passes its own GPU dequantiser through `HostWeight`.
- `HostWeight`: any tensor plus the host's own dequantise function (Forge's GGUF `dequantize_tensor`,
  bitsandbytes `functional_dequantize_4bit`), so formats the host knows are never reimplemented here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..hidden_imports import require_bitsandbytes
from .fp8_products import compiled

PLAIN_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _fp8_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


class FrozenWeight:
    """One layer's frozen weight in its stored form. Subclasses implement `_dequantize` and `storage`."""

    format: str = "?"

    def __init__(self, shape: Sequence[int]):
        self.shape = torch.Size(shape)  # the logical (out_features, in_features)

    @property
    def device(self) -> torch.device:
        return self.storage()[0].device

    def storage(self) -> list[torch.Tensor]:
        """The tensors that hold the stored form (for hashing and byte counts); never written to."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage())

    def dequantize(self, dtype: torch.dtype, device: torch.device | str | None = None, *,
                   fused: bool = False) -> torch.Tensor:
        """The weight in `dtype` on `device` (default: where it is stored): a temporary, shaped `shape`.
        `fused`: in one compiled kernel where the format has one and the device runs it (the same values)."""
        device = self.device if device is None else torch.device(device)
        with torch.no_grad():
            out = self._fused_dequantize(dtype, device) if fused else None
            if out is None:
                out = self._dequantize(dtype, device)
        if out.shape != self.shape:
            out = out.reshape(self.shape)
        return out.to(device=device, dtype=dtype)

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _fused_dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return None  # no compiled form: `_dequantize`

    def to(self, device: torch.device | str) -> FrozenWeight:
        """A copy whose stored form lives on `device` (for models the trainer owns; hosts' stay put)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be moved")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.format}, shape={tuple(self.shape)}, device={self.device})"


class PlainWeight(FrozenWeight):
    """A plain floating-point weight (cast and moved per use when its dtype/device differ)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.shape)
        self.tensor = tensor
        self.format = PLAIN_NAMES.get(tensor.dtype, str(tensor.dtype).replace("torch.", ""))

    def storage(self) -> list[torch.Tensor]:
        return [self.tensor]

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.tensor.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")

    def to(self, device: torch.device | str) -> PlainWeight:
        return PlainWeight(self.tensor.to(device))


def dequant8(data: torch.Tensor, scale: torch.Tensor | float | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values in `dtype` (exact: every e4m3/e5m2 value is a bf16, fp16 and fp32 value) times their scale (none,
    a number, or a tensor that broadcasts over them), multiplied in fp32 and rounded once to `dtype`: spelled out so
    that the compiled kernel (`compiled`, which keeps intermediates in fp32) gives the same values; Forge's own
    layers round the scale to `dtype` first (at most one unit in the last place apart). One kernel where compiled:
    torch's own fp8 cast is not vectorised, 104 of a Flux 24 GB step's 624 ms of GPU time on an H100
    (bench/results/flux_profile_h100.md)."""
    if scale is None:
        return data.to(dtype)
    return (data.float() * (scale.float() if isinstance(scale, torch.Tensor) else scale)).to(dtype)


class Fp8Weight(FrozenWeight):
    """float8 storage times an optional scale (a number, a 0-dim tensor, or one value per output row)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | float | None = None):
        if data.dtype not in _fp8_dtypes():
            raise TypeError(f"Fp8Weight needs a float8 tensor, got {data.dtype}")
        super().__init__(data.shape)
        self.data = data
        if isinstance(scale, torch.Tensor) and scale.numel() > 1:
            scale = scale.reshape(-1, *([1] * (data.dim() - 1)))  # per output row, broadcast over the rest
        self.scale = scale
        name = str(data.dtype).replace("torch.float8_", "")
        self.format = f"fp8 {name}" if scale is None else ("fp8_scaled" if _numel(scale) == 1 else f"fp8 {name} "
                                                                                                 "per-row scaled")

    def storage(self) -> list[torch.Tensor]:
        return [self.data] + ([self.scale] if isinstance(self.scale, torch.Tensor) else [])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        # Cast on the device the product runs on (an fp8 upload is half a bf16 one).
        data = self.data.to(device=device, non_blocking=device.type == "cuda")
        return data, self.scale.to(device=device) if isinstance(self.scale, torch.Tensor) else self.scale

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return dequant8(*self._on(device), dtype)

    def _fused_dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if device.type != "cuda" or not (self.scale is None or isinstance(self.scale, torch.Tensor)):
            return None  # a plain-number scale would compile once per value
        return compiled(dequant8, device.type)(*self._on(device), dtype)

    def to(self, device: torch.device | str) -> Fp8Weight:
        scale = self.scale.to(device) if isinstance(self.scale, torch.Tensor) else self.scale
        return Fp8Weight(self.data.to(device), scale)

    @classmethod
    def quantize(cls, weight: torch.Tensor, *, per_row: bool = False, scaled: bool = True,
                 dtype: torch.dtype | None = None) -> Fp8Weight:
        """fp8 of `weight`: plain cast (`scaled=False`, what "fp8 e4m3fn" checkpoints hold), one scale for
        the tensor (fp8_scaled files), or one per output row (`per_row`)."""
        dtype = dtype or torch.float8_e4m3fn
        limit = torch.finfo(dtype).max
        w = weight.detach().float()
        if not scaled:
            return cls(w.clamp(-limit, limit).to(dtype))
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_row else w.abs().amax()
        scale = (amax / limit).clamp(min=1e-12)
        return cls((w / scale).to(dtype), scale if per_row else scale.reshape(()))


class Nf4Weight(FrozenWeight):
    """bitsandbytes 4-bit storage (nf4 or fp4): packed uint8 data plus its QuantState."""

    def __init__(self, data: torch.Tensor, quant_state: Any):
        super().__init__(quant_state.shape)
        self.data = data
        self.quant_state = quant_state
        self.format = str(getattr(quant_state, "quant_type", "nf4"))

    def storage(self) -> list[torch.Tensor]:
        qs = self.quant_state
        tensors = [self.data, qs.absmax]
        if getattr(qs, "nested", False):
            tensors += [qs.state2.absmax, qs.offset]
        return tensors

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        require_bitsandbytes()  # a CLI run hides it from the libraries it imports (hidden_imports.py)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.data, self.quant_state).to(device=device, dtype=dtype)

    def to(self, device: torch.device | str) -> Nf4Weight:
        import copy

        state = copy.deepcopy(self.quant_state)
        state.to(torch.device(device))  # QuantState.to moves in place: on our copy
        return Nf4Weight(self.data.to(device), state)

    @classmethod
    def quantize(cls, weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64) -> Nf4Weight:
        require_bitsandbytes()  # a CLI run hides it from the libraries it imports (hidden_imports.py)
        from bitsandbytes.functional import quantize_4bit

        data, state = quantize_4bit(weight.detach().contiguous(), blocksize=blocksize, quant_type=quant_type)
        return cls(data, state)


class GGUFWeight(FrozenWeight):
    """Raw GGUF blocks (uint8, one row of blocks per output row) of a `gguf.GGMLQuantizationType`.

    Dequantised with the `gguf` package on the CPU (numpy): exact, but a CPU round trip per use, so
    it is the reference for tests and files; a WebUI hands over its GPU dequantiser via HostWeight.
    """

    def __init__(self, data: torch.Tensor, qtype: int, shape: Sequence[int]):
        super().__init__(shape)
        import gguf

        self.data = data
        self.qtype = gguf.GGMLQuantizationType(int(qtype))
        self.format = f"gguf {self.qtype.name}"

    def storage(self) -> list[torch.Tensor]:
        return [self.data]

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        import gguf

        values = gguf.quants.dequantize(self.data.detach().cpu().numpy(), self.qtype)
        return torch.from_numpy(values).to(device=device, dtype=dtype)

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.data.to(device), self.qtype, self.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor, qtype: Any) -> GGUFWeight:
        import gguf

        qtype = gguf.GGMLQuantizationType[qtype] if isinstance(qtype, str) else gguf.GGMLQuantizationType(qtype)
        blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), qtype)
        return cls(torch.from_numpy(blocks), qtype, weight.shape)


class HostWeight(FrozenWeight):
    """A host's own stored weight and the host's function that dequantises it.

    `source` is the host's tensor, or a function returning the host's *current* tensor (e.g.
    `lambda: layer.weight`): then each use reads wherever the host keeps the weight right now, so the
    host's memory manager may move or offload the layer and nothing of ours pins its old copy.
    `fn(tensor) -> Tensor` dequantises it as the host's layers do (None: the tensor is plain or fp8);
    it is called on the tensor after moving it to the compute device with the tensor's own `.to`
    (`move_first`, as Forge does for swapped layers). `scale` (a tensor, number, or function returning
    one, e.g. Forge's `scale_weight`) multiplies the result in the compute dtype. `extra` lists further
    stored tensors for hashing. The host's tensors are only ever read.
    """

    def __init__(self, source: torch.Tensor | Callable[[], torch.Tensor],
                 fn: Callable[[torch.Tensor], torch.Tensor] | None = None, *, shape: Sequence[int], format: str,
                 scale: torch.Tensor | float | Callable[[], torch.Tensor | float | None] | None = None,
                 move_first: bool = True, extra: Sequence[torch.Tensor] = ()):
        super().__init__(shape)
        self.source = source
        self.fn = fn
        self.scale = scale
        self.format = format
        self.move_first = move_first
        self.extra = list(extra)

    def current(self) -> torch.Tensor:
        """The host's tensor as it is now."""
        return self.source if isinstance(self.source, torch.Tensor) else self.source()

    def _current_scale(self) -> torch.Tensor | float | None:
        s = self.scale
        return s() if callable(s) and not isinstance(s, torch.Tensor) else s

    def storage(self) -> list[torch.Tensor]:
        scale = self._current_scale()
        return [self.current(), *([scale] if isinstance(scale, torch.Tensor) else []), *self.extra]

    def _dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self.current()
        if self.move_first and t.device != device:
            t = t.to(device=device, non_blocking=device.type == "cuda")
        w = (self.fn(t) if self.fn is not None else t).to(device=device, dtype=dtype)
        scale = self._current_scale()
        if scale is None:
            return w
        return w * (scale.to(device=device, dtype=dtype) if isinstance(scale, torch.Tensor) else scale)


def _numel(scale: torch.Tensor | float) -> int:
    return scale.numel() if isinstance(scale, torch.Tensor) else 1


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _fp8_dtypes()
