"""Tiny diffusers UNets with peft LoRA and their forward/backward, for the accel tests (CPU)."""

from __future__ import annotations

import copy
import functools

import torch
from peft import LoraConfig

from lora_trainer.models import tiny
from lora_trainer.models.bundle import Family

# kohya's SD1 target set (all Linear/1x1 conv in transformer blocks) plus the resnet 3x3 convs
# (LoCon) so both fused layer kinds are exercised.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1"]


@functools.cache
def base_unet(family: Family):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny.unet_config(family))
    tiny._randomize(unet, torch.Generator().manual_seed(0))
    return unet.requires_grad_(False)


def lora_unet(seed: int = 0, family: Family = Family.SD1, dropout: float = 0.0):
    unet = copy.deepcopy(base_unet(family))
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, lora_dropout=dropout,
                                init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # peft starts B at zero, which would hide the LoRA path entirely
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def inputs(unet, bs: int = 1, seed: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(bs, cfg.in_channels, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (bs,), generator=g)
    ctx = torch.randn(bs, 7, cfg.cross_attention_dim, generator=g, dtype=dtype)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(bs, n, generator=g, dtype=dtype),
                                   "time_ids": torch.ones(bs, 6, dtype=dtype)}
    return x, t, ctx, kw


def lora_grads(unet):
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def fwd_bwd(unet, batch, autocast=None):
    x, t, ctx, kw = batch
    unet.zero_grad(set_to_none=True)
    if autocast is None:
        out = unet(x, t, ctx, return_dict=False, **kw)[0]
    else:
        with torch.autocast("cpu", dtype=autocast):
            out = unet(x, t, ctx, return_dict=False, **kw)[0]
    out.float().square().mean().backward()
    return out.detach().float(), lora_grads(unet)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def assert_grads_match(got: dict, want: dict, rtol: float = 1e-4) -> None:
    """Per-tensor relative match, each against the largest gradient's scale as well as its own: the lean Linear
    product sums an input gradient in another order than autograd (fp32 rounding), and some LoRA gradients are
    zero in exact arithmetic (the tiny UNet's mid-block self-attention sees one token: its query and key get none)
    and read as rounding noise."""
    assert got.keys() == want.keys()
    scale = max(float(g.norm()) for g in want.values())
    for k, w in want.items():
        assert float((got[k] - w).norm()) <= rtol * float(w.norm()) + 1e-2 * rtol * scale, k
