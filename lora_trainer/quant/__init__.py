"""LoRA training over a quantised, frozen base (fp8 incl. scaled, nf4/fp4, GGUF, or a host's own format).

Host-independent: the base weights stay in the form their owner stores them in (a WebUI's memory,
or a file the trainer loaded) and are dequantised one layer at a time, in forward and backward,
never for the whole model. See formats.py (stored forms) and linear.py (the Linear that uses them).
"""

from .formats import Fp8Weight, FrozenWeight, GGUFWeight, HostWeight, Nf4Weight, PlainWeight, is_fp8
from .linear import (
    QuantLinear,
    formats,
    quant_layers,
    quantize_linears,
    replace_linear,
    stored_tensors,
    weights_kept_for_backward,
)

__all__ = [
    "Fp8Weight",
    "FrozenWeight",
    "GGUFWeight",
    "HostWeight",
    "Nf4Weight",
    "PlainWeight",
    "QuantLinear",
    "formats",
    "is_fp8",
    "quant_layers",
    "quantize_linears",
    "replace_linear",
    "stored_tensors",
    "weights_kept_for_backward",
]
