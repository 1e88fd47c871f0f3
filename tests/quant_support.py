"""What the quantised-base tests share (tests/test_quant.py, tests/test_quant_accel.py): the stored formats,
a tiny Flux-like MLP block, peft adapters on it, and its LoRA gradients."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch
from bnb_support import HAS_BNB
from torch import nn

from lora_trainer import quant
from lora_trainer.quant import Fp8Weight, GGUFWeight, HostWeight, Nf4Weight

HAS_GGUF = importlib.util.find_spec("gguf") is not None


needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes does not import or has no CPU 4-bit kernels here")


def int8_rows(w: torch.Tensor) -> HostWeight:
    """A host format this package does not know (Neo-like int8 with per-row scales), dequantised by the
    host's own function: proves HostWeight calls what it is given."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    calls = []

    def dequant(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return t.float() * scale.to(t.device)

    hw = HostWeight(q, dequant, shape=w.shape, format="int8 (host)", extra=[scale])
    hw.calls = calls  # type: ignore[attr-defined]
    return hw


# format name -> (make FrozenWeight from an fp32 weight, relative tolerance vs the unquantised base)
FORMATS = {
    "fp8": (lambda w: Fp8Weight.quantize(w, scaled=False), 0.08),
    "fp8_scaled": (lambda w: Fp8Weight.quantize(w), 0.08),
    "fp8_per_row": (lambda w: Fp8Weight.quantize(w, per_row=True), 0.08),
    "int8_host": (int8_rows, 0.03),
    "gguf_Q8_0": (lambda w: GGUFWeight.quantize(w, "Q8_0"), 0.02),
    "gguf_Q5_1": (lambda w: GGUFWeight.quantize(w, "Q5_1"), 0.1),
    "gguf_Q4_0": (lambda w: GGUFWeight.quantize(w, "Q4_0"), 0.25),
    "nf4": (lambda w: Nf4Weight.quantize(w), 0.25),
}
MARKS = {"gguf_Q8_0": needs_gguf, "gguf_Q5_1": needs_gguf, "gguf_Q4_0": needs_gguf, "nf4": needs_bnb}
PARAMS = [pytest.param(k, marks=MARKS[k]) if k in MARKS else k for k in FORMATS]

D_IN, D_HID, RANK = 64, 128, 4  # distinct sizes: a saved (128, 64) tensor would be a dequantised weight;
# multiples of 64 (bitsandbytes 0.50.2 on the CPU mis-dequantises rows that are not: 27% error at 64x96)


class Block(nn.Module):
    """A Flux-like MLP piece: two Linears with biases and a GELU."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.fc2 = nn.Linear(D_HID, D_IN)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def quantized(block: Block, make) -> tuple[Block, dict[str, quant.FrozenWeight]]:
    frozen: dict[str, quant.FrozenWeight] = {}

    def q(name, layer):
        frozen[name] = make(layer.weight.detach().float())
        return frozen[name]

    assert quant.quantize_linears(block.requires_grad_(False), q) == 2
    return block, frozen


def reference(frozen: dict[str, quant.FrozenWeight], dtype=torch.float32) -> Block:
    """The same block with plain nn.Linear weights equal to the dequantised ones."""
    ref = Block().to(dtype)
    with torch.no_grad():
        for name, fw in frozen.items():
            ref.get_submodule(name).weight.copy_(fw.dequantize(dtype))
    return ref


def with_lora(block: nn.Module, seed: int = 1) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(block)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["fc1", "fc2"]), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B so that every A gets a gradient too
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.data = (torch.randn(p.shape, generator=g) * 0.1).to(p.device)
    return model


def lora_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.float().square().mean()).backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else
                 t.detach().reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def x_input(dtype=torch.float32):
    return torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(5)).to(dtype)
