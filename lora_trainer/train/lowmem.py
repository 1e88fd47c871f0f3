"""Put a large frozen module on the device layer by layer, optionally with fp8 base weights.

Used for models the engine loaded itself (memory-mapped file tensors): each Linear goes to the device
alone and, with fp8, becomes a `quant.QuantLinear` over an fp8 weight there (one scale per output row;
dequantised per layer in forward and backward), so the device never holds more than the fp8 model plus
one layer in the training dtype. Weights a file already stores in fp8 (Flux `fp8_e4m3fn` and "scaled
fp8" files, `t5xxl_fp8_e4m3fn`) stay fp8 as stored with fp8 on, and are dequantised layer by layer
into the training dtype with it off. Everything else in the module is moved and cast as usual.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE = "scale_weight"  # per-layer scale of "scaled fp8" files (models/flux/fp8.py)


def _fp8_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in _fp8_dtypes()


def has_fp8_weights(module: nn.Module) -> bool:
    return any(is_fp8(p) for p in module.parameters())


def place_module(module: nn.Module, device: torch.device | str, dtype: torch.dtype, *, fp8: bool = False) -> int:
    """Move `module` to `device`/`dtype` one Linear at a time; with `fp8` its frozen Linears become fp8
    QuantLinears. Returns how many Linears are fp8 now. Trainable layers are left to the caller."""
    from ..quant import Fp8Weight, QuantLinear

    device = torch.device(device)
    done = 0
    for parent_name, parent in list(module.named_modules()):
        for name, layer in list(parent.named_children()):
            if type(layer) is not nn.Linear or any(p.requires_grad for p in layer.parameters(recurse=False)):
                continue
            w = layer.weight.detach()
            scale = layer._buffers.pop(SCALE, None)
            bias = None if layer.bias is None else layer.bias.detach().to(device=device, dtype=dtype)
            if is_fp8(w):
                data = w.to(device)
                scale = None if scale is None else scale.to(device=device, dtype=torch.float32)
                frozen = Fp8Weight(data, scale)
                if not fp8:  # the training dtype, one layer at a time
                    layer.weight = nn.Parameter(frozen.dequantize(dtype, device), requires_grad=False)
                    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
                    continue
            elif fp8:
                frozen = Fp8Weight.quantize(w.to(device=device, dtype=dtype), per_row=True)
            else:
                layer.to(device=device, dtype=dtype)
                continue
            setattr(parent, name, QuantLinear(frozen, bias, dtype=dtype, device=device))
            done += 1
            del w, layer
    module.to(device=device, dtype=dtype)  # norms, embeddings, biases, QuantLinear compute dtype
    return done
