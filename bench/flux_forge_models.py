"""The random full-size FLUX.1-dev of bench/flux_forge_handoff.py, laid out as Forge main / Neo hold it.

`build_forge_flux` makes it with the Forge-shaped stand-ins of tests/forge_flux_standins.py (`make_forge_flux`)
from `full_size_ref` (transformer bf16, CLIP-L fp16, T5 fp16, VAE bf16, drawn part by part with `random_part`);
`store` is the stand-ins' `store_weight` with GGUF Q8_0 made in torch (`TorchQ8_0`, Neo's block layout and
dequantize_pytorch; `q8_0_matches_gguf` checks its bytes against the `gguf` package where that is installed).
`BLOCKS` (the script's --blocks): fewer double/single blocks and T5 layers at full width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SEED = 1234
BLOCKS: tuple[int, int, int] | None = None  # --blocks: fewer double/single blocks and T5 layers, full widths


# ---------------------------------------------------------------- GGUF Q8_0 in torch (Forge/Neo's layout)
class TorchQ8_0:
    """A Forge/Neo GGUF quant class for Q8_0 (a weight's `gguf_cls`), in torch on the weight's device.

    A Q8_0 tensor is stored as uint8, 34 bytes per block of 32 values: the fp16 scale d = absmax / 127, then
    the 32 int8 values round(w / d) (gguf-py's quantize, rounding half away from zero). `dequantize_pytorch`
    computes d * q in the parameter's computation_dtype, as Neo's quants.py does on the device."""

    __name__ = "Q8_0"
    block_size, type_size = 32, 34

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        blocks = w.float().reshape(-1, self.block_size)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = blocks * inv
        a = x.abs()
        floored = a.floor()
        q = torch.sign(x) * (floored + (2 * (a - floored)).floor())  # gguf-py's np_roundf
        out = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
        return out.reshape(rows, -1)

    def dequantize_pytorch(self, p: torch.Tensor) -> torch.Tensor:
        blocks = p.view(torch.uint8).reshape(-1, self.type_size)
        d = blocks[:, :2].contiguous().view(torch.float16).to(p.computation_dtype)
        q = blocks[:, 2:].contiguous().view(torch.int8)
        return (d * q).reshape(p.real_shape)


Q8_0 = TorchQ8_0()


def store(w: torch.Tensor, fmt: str):
    """The stand-ins' `store_weight`, with GGUF Q8_0 made in torch (on the GPU) and nf4 quantised from the bf16
    values (as Forge does from a bf16 file: its quant_state, and so the dequantised weight, is bf16)."""
    from forge_flux_standins import store_weight

    if fmt == "gguf":
        with torch.inference_mode():
            rows = max(1, QUANT_CHUNK // w.shape[1])  # a few rows at a time: the same bytes, small temporaries
            weight = nn.Parameter(torch.cat([Q8_0.quantize(w[i:i + rows]) for i in range(0, w.shape[0], rows)]),
                                  requires_grad=False)
        weight.gguf_cls, weight.real_shape, weight.computation_dtype = Q8_0, w.shape, torch.float16
        return weight, None
    if fmt == "nf4":
        return store_nf4(w.to(torch.bfloat16))
    return store_weight(w, fmt)


QUANT_CHUNK = 1 << 22  # values quantised at a time (nf4 on the CPU, Q8_0): the temporaries stay small


def store_nf4(w: torch.Tensor):
    """The stand-ins' nf4 `store_weight`, on the CPU in chunks of whole 64-value blocks: the same bytes and
    quant_state (each block is quantised on its own), without bitsandbytes' CPU kernel taking ~16 floats per
    value of a whole matrix at once (11 GiB for a 3072 x 21504 one)."""
    from bitsandbytes.functional import quantize_4bit
    from forge_flux_standins import store_weight

    if w.device.type != "cpu" or w.numel() <= QUANT_CHUNK:
        return store_weight(w, "nf4")
    flat = w.contiguous().reshape(-1)
    parts = [quantize_4bit(flat[i:i + QUANT_CHUNK], blocksize=64, quant_type="nf4")
             for i in range(0, flat.numel(), QUANT_CHUNK)]
    state = parts[0][1]
    state.absmax, state.shape = torch.cat([s.absmax for _, s in parts]), w.shape
    with torch.inference_mode():
        weight = nn.Parameter(torch.cat([q for q, _ in parts]), requires_grad=False)
    weight.quant_state, weight.bnb_quantized, weight.quant_type = state, True, "nf4"
    return weight, None


def q8_0_matches_gguf() -> bool | None:
    """Our Q8_0 bytes are gguf-py's (None where the gguf package is missing, as on the GPU machine)."""
    try:
        import gguf
    except ImportError:
        return None
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :32] = 0  # a block of zeros: d = 0
    want = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    got = Q8_0.quantize(w)
    p = got.clone()
    p.real_shape, p.computation_dtype = w.shape, torch.float32
    back = torch.from_numpy(gguf.quants.dequantize(want, gguf.GGMLQuantizationType.Q8_0))
    return bool((got.numpy() == want).all() and torch.equal(Q8_0.dequantize_pytorch(p), back))


# ---------------------------------------------------------------- the random full-size Flux.1-dev
def _meta_parts():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_trainer.models.flux import FLUX_DEV, FluxTransformer
    from lora_trainer.models.ldm_config import bundled_config

    clip_cfg = bundled_config("clip_vit_l14")
    t5_cfg = bundled_config("t5_xxl")
    vae_cfg = bundled_config("flux_vae")
    params = FLUX_DEV
    if BLOCKS:
        params = FLUX_DEV.replace(depth=BLOCKS[0], depth_single_blocks=BLOCKS[1])
        t5_cfg.update(num_layers=BLOCKS[2], num_decoder_layers=BLOCKS[2])
    return {
        "transformer": lambda: FluxTransformer(params),
        "clip": lambda: CLIPTextModel(CLIPTextConfig(**{k: v for k, v in clip_cfg.items()
                                                        if k not in ("architectures", "model_type")})),
        "t5": lambda: T5EncoderModel(T5Config(**{k: v for k, v in t5_cfg.items() if k != "architectures"})),
        "vae": lambda: AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")}),
    }


def random_part(part: str, dtype: torch.dtype, device: torch.device, *, seed: int = SEED,
                values_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One part of the random Flux.1-dev, built on the meta device and drawn on `device` (flux_files.py's
    recipe: N(0, 0.5^2/fan_in) matrices, norms 1 + N(0, 0.02^2), embeddings and biases N(0, 0.02^2)), rounded
    to `values_dtype` and stored in `dtype`: the same seed gives the same values in any dtype."""
    from flux_files import _values

    with torch.device("meta"):
        module = _meta_parts()[part]()
    module = module.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed + ("transformer", "clip", "t5", "vae").index(part))
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(_values(name, tuple(p.shape), g).clamp(-448, 448).to(values_dtype))
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=device).expand(b.shape))
    return module.eval().requires_grad_(False)


def full_size_ref(device: torch.device):
    """The bundle whose weights Forge's parts are made of: transformer bf16, CLIP-L fp16, T5 fp16, VAE bf16."""
    from lora_trainer.models.bundle import FLOW, Family, ModelBundle

    transformer = random_part("transformer", torch.bfloat16, device)
    clip = random_part("clip", torch.float16, device)
    t5 = random_part("t5", torch.float16, device)
    vae = random_part("vae", torch.bfloat16, device)
    return ModelBundle(family=Family.FLUX1, prediction_type=FLOW, unet=transformer, vae=vae, text_encoders=[clip, t5],
                       tokenizers=[], scaling_factor=0.3611,
                       shift_factor=0.1159, name="flux1-dev-random", source="built in memory", variant="dev")


def build_forge_flux(fmt: str, device: torch.device, tiny: bool):
    """(Forge-shaped sd_model, a function giving the fp32 transformer with the values Forge's were made from)."""
    from forge_flux_standins import make_forge_flux

    if tiny:
        from lora_trainer.models.flux.tiny import build_tiny_flux_bundle

        ref = build_tiny_flux_bundle("dev", seed=0)
        ref.unet.to(torch.bfloat16).float()  # Forge's weights made from bf16 values, as at full size
        for m in (ref.unet, *ref.text_encoders, ref.vae):
            m.to(device)
        sd_model, ref = make_forge_flux(fmt, t5_fmt="fp8", clip_fmt="fp16" if device.type == "cuda" else "fp32",
                                        ref=ref, store=store)
        return sd_model, lambda: copy.deepcopy(ref.unet)
    ref = full_size_ref(device)
    sd_model, _ = make_forge_flux(fmt, t5_fmt="fp8", clip_fmt="fp16", ref=ref, keep_ref=False, store=store)
    sd_model.filename = sd_model.sd_checkpoint_info.filename = "/models/flux1-dev-random.safetensors"
    sd_model.sd_checkpoint_info.model_name = "flux1-dev-random"
    return sd_model, lambda: random_part("transformer", torch.float32, device)
