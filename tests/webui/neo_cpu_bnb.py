"""Test-only shim, installed into Forge Neo as an extension script by test_neo_flux_integration.py when Neo runs
without CUDA, and removed afterwards. Not part of LoRA Trainer.

Why (mocked because it cannot run here as written): Neo's bitsandbytes code (backend/operations_bnb.py) moves a
4-bit weight to CUDA to dequantise it (`functional_dequantize_4bit`) and to quantise a merged weight again
(`ForgeLoader4Bit.reload_weight`), and quantises a weight that was not pre-quantised when it is moved to CUDA
(`ForgeParams4bit.to`), from when bitsandbytes had CUDA kernels only. bitsandbytes 0.48+ (Neo pins 0.49.1) runs
the same functions on the CPU, so on a machine without CUDA these three do the same arithmetic on the CPU (the
last one when the weight is moved to the CPU, Neo's compute device there) instead of failing on `.cuda()` or
leaving the weight unquantised. Loading, key matching, LoRA merging and the 4-bit matmul stay Neo's and
bitsandbytes' own code.
"""

from __future__ import annotations

import torch

if not torch.cuda.is_available():
    from backend import memory_management

    if memory_management.bnb_enabled():
        from backend import operations, operations_bnb
        from bitsandbytes.functional import dequantize_4bit

        def functional_dequantize_4bit(weight):
            if not weight.bnb_quantized:
                return weight
            return dequantize_4bit(weight, quant_state=weight.quant_state, blocksize=weight.blocksize,
                                   quant_type=weight.quant_type)

        def reload_weight(self, weight):
            old = self.weight
            self.weight = operations_bnb.ForgeParams4bit(
                weight, requires_grad=False, compress_statistics=old.compress_statistics, blocksize=old.blocksize,
                quant_type=old.quant_type, quant_storage=old.quant_storage, bnb_quantized=False,
            )._quantize(weight.device)
            return self

        to_device = operations_bnb.ForgeParams4bit.to

        def to(self, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
            if device is not None and device.type == "cpu" and not self.bnb_quantized:
                return self._quantize(device)
            return to_device(self, *args, **kwargs)

        operations_bnb.ForgeParams4bit.to = to
        operations_bnb.functional_dequantize_4bit = functional_dequantize_4bit
        if hasattr(operations, "functional_dequantize_4bit"):
            operations.functional_dequantize_4bit = functional_dequantize_4bit
        operations_bnb.ForgeLoader4Bit.reload_weight = reload_weight
        print("LoRA Trainer test shim: bitsandbytes 4-bit (de)quantisation on the CPU (no CUDA)")
