"""bench/speed.py's models and inputs: random-weight SD1.5 / SDXL UNets from the bundled configs (tiny ones for the
CPU smoke test) with a fresh peft LoRA on kohya's default targets, cached-latent batches and the engine-style loss;
and the device helpers the timed loops use. `configure(tiny)` first."""

from __future__ import annotations

import gc
import json
import os

import torch
import torch.nn.functional as F

from lora_trainer import accel

TINY = False
DEV = "cuda"
BF16 = torch.bfloat16
KOHYA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CFG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lora_trainer", "models", "configs")


def configure(tiny: bool) -> None:
    """The CPU smoke test (`tiny`: tiny configs, fp32) or the GPU where there is one (bf16, cuDNN autotuned)."""
    global TINY, DEV, BF16
    TINY = tiny
    DEV = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    BF16 = torch.float32 if tiny else torch.bfloat16  # CPU bf16 is slow: the smoke test runs fp32
    if DEV == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mem():
    if DEV != "cuda":
        return {}
    return {"peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


# ------------------------------------------------------------------ models
def unet_config(kind: str) -> dict:
    with open(os.path.join(CFG_DIR, f"{kind}_unet.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    if TINY:
        from lora_trainer.models.bundle import Family
        from lora_trainer.models.tiny import unet_config as tiny_cfg
        cfg = tiny_cfg(Family.SDXL if kind == "sdxl" else Family.SD1)
    return cfg


_BASE: dict = {}


def base_unet(kind: str):
    """One frozen bf16 UNet per family, reused by every variant (deep copies would double memory)."""
    if kind not in _BASE:
        from diffusers import UNet2DConditionModel
        _BASE.clear()
        free()
        torch.manual_seed(0)
        with torch.device(DEV):
            unet = UNet2DConditionModel(**unet_config(kind))
        _BASE[kind] = unet.to(BF16).requires_grad_(False).train()
    return _BASE[kind]


def drop_base() -> None:
    """Forget the shared UNet (fp8 replaces its Linear modules: the next variant builds a fresh one)."""
    _BASE.clear()


def has_base(kind: str) -> bool:
    return kind in _BASE


class Lora:
    """The shared base UNet with a fresh peft adapter (removed again by `close`)."""

    def __init__(self, kind: str, rank: int, alpha: float, seed: int = 0):
        from peft import LoraConfig
        self.kind = kind
        self.unet = base_unet(kind)
        torch.manual_seed(seed)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=KOHYA_TARGETS,
                                         init_lora_weights="gaussian", lora_dropout=0.0), adapter_name="bench")
        self.params = [p_ for p_ in self.unet.parameters() if p_.requires_grad]
        for p_ in self.params:
            p_.data = p_.data.float()
        self.n_modules = sum(1 for m in self.unet.modules() if hasattr(m, "lora_A") and "bench" in m.lora_A)

    def close(self):
        accel.unfuse_lora_layers(self.unet)
        accel.restore_norms(self.unet)
        accel.restore_geglu(self.unet)  # the base UNet is shared: the next variant starts from diffusers' forward
        self.unet.delete_adapters("bench")
        self.unet.disable_gradient_checkpointing()
        self.unet.to(memory_format=torch.contiguous_format)
        self.params = []
        free()


def make_inputs(unet, kind: str, bs: int, latent: int, seed: int = 1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    cfg = unet.config
    lat = torch.randn(bs, 4, latent, latent, device=DEV, generator=g)
    enc = torch.randn(bs, 77, cfg.cross_attention_dim, device=DEV, generator=g, dtype=BF16)
    added = None
    if kind == "sdxl":
        n = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        px = latent * 8
        added = {"text_embeds": torch.randn(bs, n, device=DEV, generator=g, dtype=BF16),
                 "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * bs, device=DEV, dtype=BF16)}
    return lat, enc, added


def alphas(unet_device):
    from diffusers import DDPMScheduler
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return s.alphas_cumprod.to(unet_device)


def make_loss_fn(unet, acs, added):
    """The engine-style pure loss: every random draw arrives in the batch."""
    def loss_fn(b):
        a = acs[b["t"]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * b["latents"] + (1 - a).sqrt() * b["noise"]
        with torch.autocast(DEV, dtype=BF16, enabled=not TINY):
            pred = unet(noisy, b["t"], b["enc"], added_cond_kwargs=added, return_dict=False)[0]
        return F.mse_loss(pred.float(), b["noise"].float())
    return loss_fn


def batches(lat, enc, seed: int = 5):
    g = torch.Generator(device=DEV).manual_seed(seed)
    bs = lat.shape[0]
    while True:
        yield {"latents": lat, "enc": enc, "noise": torch.randn(lat.shape, device=DEV, generator=g),
               "t": torch.randint(0, 1000, (bs,), device=DEV, generator=g)}
