"""Forge-shaped stand-ins for a Flux model as Forge main and Neo hold it (what webui/forge_flux.py reads), shared by
tests/test_webui_forge_flux.py and bench/flux_forge_handoff.py (`forge_tensors` also by tests/test_webui_forge.py);
`make_forge_chroma` lays out a Chroma as Neo holds it (tests/test_webui_forge_chroma.py).

Forge's own code cannot run in CI, so these reproduce what the hand-off reads: a `Flux` engine whose
`forge_objects_original` has the transformer in BFL layout with Forge-style Linear layers (weight stored as
fp32/bf16, fp8, fp8 + `scale_weight`, GGUF blocks with a `gguf_cls`, or bitsandbytes nf4 with a `quant_state`;
dequantised per call in forward, as Forge's operations do), CLIP-L as a transformers CLIPTextModel, T5 with
transformers' names and a config dict, and an LDM-named VAE; every weight an inference tensor, as Forge's loader
makes them. Forge's dequantisers are stand-ins installed as `backend.operations_gguf` / `backend.operations_bnb`
(`backend_modules`; GGUF via the `gguf` package, nf4 via bitsandbytes).
"""

from __future__ import annotations

import copy
import types
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
from lora_trainer.models.ldm_convert import vae_to_ldm


# ---------------------------------------------------------------- Forge-shaped stand-ins
class Flux(SimpleNamespace):
    """Forge's diffusion engine class for Flux.1 is named `Flux`."""


class Chroma(SimpleNamespace):
    """Neo's (and Forge main's) diffusion engine class for Chroma is named `Chroma`."""


class FakeGGUFQuant:
    """Stands in for a Forge gguf quant class (`gguf_cls`): `dequantize_pytorch(parameter)`."""

    def __init__(self, qtype):
        self.qtype = qtype
        self.__name__ = qtype.name

    def dequantize_pytorch(self, p):
        import gguf

        values = gguf.quants.dequantize(p.detach().cpu().numpy(), self.qtype)
        return torch.from_numpy(values).to(torch.float16).reshape(p.real_shape)  # Forge: computation_dtype fp16


def store_weight(w: torch.Tensor, fmt: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """(weight as Forge stores it, scale_weight or None), both inference tensors."""
    scale = None
    with torch.inference_mode():
        if fmt in ("fp32", "bf16", "fp16"):
            weight = nn.Parameter(w.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt]),
                                  requires_grad=False)
        elif fmt == "fp8":
            weight = nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
        elif fmt in ("fp8_scaled", "fp32_scaled"):  # fp32_scaled: an fp8_scaled file in Forge main's CPU storage
            s = w.abs().max() / 448
            stored = (w / s).to(torch.float8_e4m3fn)
            weight = nn.Parameter(stored if fmt == "fp8_scaled" else stored.float(), requires_grad=False)
            scale = nn.Parameter(s.reshape(()), requires_grad=False)
        elif fmt == "gguf":
            import gguf

            qtype = gguf.GGMLQuantizationType.Q8_0
            weight = nn.Parameter(torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype)), requires_grad=False)
            weight.gguf_cls = FakeGGUFQuant(qtype)
            weight.real_shape = w.shape
            weight.computation_dtype = torch.float16
        elif fmt == "nf4":
            from bitsandbytes.functional import quantize_4bit

            data, state = quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
            weight = nn.Parameter(data, requires_grad=False)
            weight.quant_state, weight.bnb_quantized, weight.quant_type = state, True, "nf4"
        else:
            raise ValueError(fmt)
    return weight, scale


def forge_dequantize(t: torch.Tensor) -> torch.Tensor:
    if getattr(t, "gguf_cls", None) is not None:
        return t.gguf_cls.dequantize_pytorch(t)
    if getattr(t, "bnb_quantized", False):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(t, quant_state=t.quant_state)
    return t


class FakeForgeLinear(nn.Module):
    """Forge's operations.Linear: the weight as stored (+ scale_weight), dequantised and cast per call.
    `store`: how a weight is stored (`store_weight`; the GPU benchmark passes its own for GGUF on the GPU)."""

    def __init__(self, linear: nn.Linear, fmt: str, store=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, scale = (store or store_weight)(linear.weight.detach().float(), fmt)
        if scale is not None:
            self.scale_weight = scale
        with torch.inference_mode():
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = forge_dequantize(self.weight).to(x.dtype)
        if getattr(self, "scale_weight", None) is not None:
            w = w * self.scale_weight.to(w.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def forge_ops(module: nn.Module, fmt: str, store=None) -> nn.Module:
    """Every nn.Linear -> FakeForgeLinear(fmt); every other parameter an inference tensor."""
    for name in [n for n, child in module.named_modules() if type(child) is nn.Linear]:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, leaf, FakeForgeLinear(getattr(owner, leaf), fmt, store))  # the old Linear freed as it goes
    for name, p in list(module.named_parameters()):
        if p.is_inference():
            continue
        parent, _, leaf = name.rpartition(".")
        with torch.inference_mode():
            setattr(module.get_submodule(parent) if parent else module, leaf,
                    nn.Parameter(p.detach().clone(), requires_grad=False))
    return module.eval()


class FakePatcher:
    def __init__(self, model):
        self.model = model
        self.refreshed = 0

    def refresh_loras(self):
        self.refreshed += 1


class FakeForgeObjects(SimpleNamespace):
    def shallow_copy(self):
        return FakeForgeObjects(unet=self.unet, clip=self.clip, vae=self.vae, clipvision=None)


def make_forge_flux(fmt: str = "fp32", *, t5_fmt: str = "fp32", clip_fmt: str = "fp32", seed: int = 0,
                    variant: str = "dev", ref=None, keep_ref: bool = True, store=None):
    """(Forge-shaped Flux sd_model, the bundle whose weights it holds).

    ref: that bundle (default: the tiny one of `seed`/`variant`); Forge's parts are built on its device, its
    non-Linear weights keep their dtype. keep_ref=False turns ref's own modules into Forge's (no second copy:
    the full-size GPU benchmark; ref is used up). store: `store_weight`'s replacement for FakeForgeLinear."""
    ref = ref if ref is not None else build_tiny_flux_bundle(variant, seed=seed)
    own = (lambda m: m) if not keep_ref else copy.deepcopy
    params = ref.unet.params
    transformer = forge_ops(own(ref.unet), fmt, store)
    # Forge's IntegratedFluxTransformer2DModel: the same BFL module tree, `config` a plain dict
    transformer.__class__ = type("IntegratedFluxTransformer2DModel", (type(transformer),), {"config": None})
    transformer.config = {"in_channels": params.in_channels // 4, "vec_in_dim": params.vec_in_dim,
                          "context_in_dim": params.context_in_dim, "hidden_size": params.hidden_size,
                          "mlp_ratio": params.mlp_ratio, "num_heads": params.num_heads, "depth": params.depth,
                          "depth_single_blocks": params.depth_single_blocks, "axes_dim": list(params.axes_dim),
                          "theta": params.theta, "qkv_bias": params.qkv_bias, "guidance_embed": params.guidance_embed}
    clip = nn.Module()  # Forge's IntegratedCLIP: a CLIPTextModel at .transformer
    clip.transformer = forge_ops(own(ref.text_encoders[0]), clip_fmt, store)
    joint = nn.Module()
    joint.clip_l, joint.t5xxl = clip, _forge_t5(own(ref.text_encoders[1]), t5_fmt, store)
    return _engine(Flux, transformer, joint, ref, "flux-tiny", "cd"), ref


class _NeoRMSNorm(getattr(nn, "RMSNorm", nn.Module)):  # torch >= 2.4 (Neo's stack); older stacks skip Neo's
    """torch's RMSNorm, as Neo holds it (parameter `weight`). `scale` only lets the mocked forward (ours) reach
    that weight: our blocks hand their q/k norms' scales to `BlockMath`, so Neo's eps is not what computes here."""

    @property
    def scale(self) -> torch.Tensor:
        return self.weight


def make_forge_chroma(fmt: str = "fp32", *, t5_fmt: str = "fp32", seed: int = 0, layout: str = "neo"):
    """(Neo-shaped Chroma sd_model, the tiny Chroma bundle whose weights it holds), as Neo's `Chroma` engine
    (backend/diffusion_engine/chroma.py) lays it out: `clip.cond_stage_model` holds `t5xxl` only, the
    transformer is an `IntegratedChromaTransformer2DModel` (backend/nn/chroma.py) in BFL layout with its
    approximator sizes as attributes (`in_dim`, `out_dim`, `hidden_dim`, `n_layers`), `in_channels` 64 (already
    patchified), every RMSNorm a torch.nn.RMSNorm (parameter `weight`, not BFL's `scale`)
    and `config` huggingface_guess's dict (`image_model` "chroma", `vec_in_dim` None).
    Mocked: the transformer's forward is ours (Neo's `forward_orig` needs `backend.*`), over Neo-named modules.

    `layout="main"`: as lllyasviel's Forge main holds it instead (`backend/nn/chroma.py`, `backend/loader.py`):
    BFL's RMSNorm (`scale`), no approximator attributes, and the config its loader writes for a Chroma file
    (huggingface_guess's FLUX.1-schnell config: latent `in_channels` 16, plus `guidance_out_dim`,
    `guidance_hidden_dim`, `guidance_n_layers`, without `guidance_embed`)."""
    ref = build_tiny_flux_bundle("chroma", seed=seed)
    params = ref.unet.params
    transformer = forge_ops(copy.deepcopy(ref.unet), fmt)
    if layout == "main":
        transformer.__class__ = type("IntegratedChromaTransformer2DModel", (type(transformer),), {"config": None})
        for name in ("in_dim", "out_dim", "hidden_dim", "n_layers"):
            transformer.__dict__.pop(name, None)
        transformer.config = {"in_channels": params.in_channels // 4, "patch_size": 2, "vec_in_dim": 768,
                              "context_in_dim": params.context_in_dim, "hidden_size": params.hidden_size,
                              "mlp_ratio": params.mlp_ratio, "num_heads": params.num_heads, "depth": params.depth,
                              "depth_single_blocks": params.depth_single_blocks, "axes_dim": list(params.axes_dim),
                              "theta": params.theta, "qkv_bias": params.qkv_bias,
                              "guidance_out_dim": params.hidden_size,
                              "guidance_hidden_dim": params.approximator_hidden_size,
                              "guidance_n_layers": params.approximator_depth}
        joint = nn.Module()
        joint.t5xxl = _forge_t5(copy.deepcopy(ref.text_encoders[0]), t5_fmt, None)
        return _engine(Chroma, transformer, joint, ref, "chroma-tiny", "ce"), ref
    for name, module in list(transformer.named_modules()):
        if type(module).__name__ == "RMSNorm":  # ours -> torch's, holding the same values as an inference tensor
            norm = _NeoRMSNorm(module.scale.shape[0])
            with torch.inference_mode():
                norm.weight = nn.Parameter(module.scale.detach().clone(), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, leaf, norm)
    transformer.__class__ = type("IntegratedChromaTransformer2DModel", (type(transformer),), {"config": None})
    transformer.in_dim, transformer.out_dim = params.approximator_in_dim, params.hidden_size
    transformer.hidden_dim, transformer.n_layers = params.approximator_hidden_size, params.approximator_depth
    transformer.config = {"image_model": "chroma", "in_channels": params.in_channels,
                          "out_channels": params.out_channels, "vec_in_dim": None,
                          "context_in_dim": params.context_in_dim, "hidden_size": params.hidden_size,
                          "mlp_ratio": params.mlp_ratio, "num_heads": params.num_heads, "depth": params.depth,
                          "depth_single_blocks": params.depth_single_blocks, "axes_dim": list(params.axes_dim),
                          "theta": params.theta, "patch_size": 2, "qkv_bias": params.qkv_bias,
                          "in_dim": params.approximator_in_dim, "out_dim": params.hidden_size,
                          "hidden_dim": params.approximator_hidden_size, "n_layers": params.approximator_depth,
                          "txt_ids_dims": []}
    joint = nn.Module()
    joint.t5xxl = _forge_t5(copy.deepcopy(ref.text_encoders[0]), t5_fmt, None)
    return _engine(Chroma, transformer, joint, ref, "chroma-tiny", "ce"), ref


def _forge_t5(hf_t5: nn.Module, fmt: str, store) -> nn.Module:
    """Forge's IntegratedT5 over a transformers T5EncoderModel (used up)."""
    t5_inner = nn.Module()  # Forge's own T5: transformers' names, a config dict
    t5_inner.shared, t5_inner.encoder = hf_t5.shared, hf_t5.encoder
    hf_t5.encoder.embed_tokens = None  # Forge's T5Stack has none (the embedding is `shared` only)
    t5_inner.config = hf_t5.config.to_dict()
    t5 = nn.Module()
    t5.transformer = forge_ops(t5_inner, fmt, store)
    return t5


def _engine(cls: type, transformer: nn.Module, joint: nn.Module, ref, name: str, hash_byte: str):
    """The diffusion engine around Forge's parts, with an LDM-named VAE holding ref's VAE weights."""
    vae_cfg = ref.vae.config
    vae = nn.Module()
    with torch.inference_mode():
        for k, v in vae_to_ldm(ref.vae.state_dict(), len(vae_cfg.block_out_channels), vae_cfg.layers_per_block,
                               prefix="").items():
            *path, leaf = k.split(".")
            m = vae
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, nn.Parameter(v.detach().clone(), requires_grad=False))
    vae.config = dict(vae_cfg)
    vae.scaling_factor, vae.shift_factor = 0.3611, 0.1159
    kmodel = nn.Module()
    kmodel.diffusion_model = transformer
    unet = FakePatcher(kmodel)
    original = FakeForgeObjects(unet=unet, clip=SimpleNamespace(patcher=FakePatcher(joint), cond_stage_model=joint),
                                vae=SimpleNamespace(first_stage_model=vae), clipvision=None)
    filename = f"/models/{name}.safetensors"
    return cls(forge_objects=original.shallow_copy(), forge_objects_original=original,
               forge_objects_after_applying_lora=original.shallow_copy(), current_lora_hash="[]", filename=filename,
               sd_checkpoint_info=SimpleNamespace(filename=filename, model_name=name, sha256=hash_byte * 32))


def forge_tensors(sd_model) -> dict[str, torch.Tensor]:
    fo = sd_model.forge_objects_original
    out = {}
    for prefix, m in (("unet.", fo.unet.model.diffusion_model), ("clip.", fo.clip.cond_stage_model),
                      ("vae.", fo.vae.first_stage_model)):
        out.update({prefix + k: v for k, v in m.named_parameters()})
    return out


def backend_modules() -> tuple[dict[str, types.ModuleType], list]:
    """Stand-ins for Forge's `backend.*` modules the hand-off imports ({name: module}, the calls list that
    load_models_gpu appends to)."""
    calls = []
    backend = types.ModuleType("backend")
    gguf_ops = types.ModuleType("backend.operations_gguf")
    gguf_ops.dequantize_tensor = forge_dequantize
    bnb_ops = types.ModuleType("backend.operations_bnb")
    bnb_ops.functional_dequantize_4bit = forge_dequantize
    mm = types.ModuleType("backend.memory_management")
    mm.load_models_gpu = lambda models, memory_required=0, **kw: calls.append((list(models), memory_required))
    args = types.ModuleType("backend.args")
    args.dynamic_args = {"kontext": False}
    mods = {"backend": backend, "backend.operations_gguf": gguf_ops, "backend.operations_bnb": bnb_ops,
            "backend.memory_management": mm, "backend.args": args}
    for name, mod in mods.items():
        if "." in name:
            setattr(backend, name.split(".", 1)[1], mod)
    return mods, calls


# The LoRA's effect (output with it - output without it) on the quantised base vs on the unquantised one:
# relative error bounded by the format's own rounding (fp8 e4m3: 3 mantissa bits; Q8_0: 8 bits per block;
# nf4: 16 levels per 64 values). Measured on these tiny models: fp8_scaled 6.8%, Q8_0 1.5%, nf4 28%.
EFFECT_TOLERANCE = {"fp8_scaled": 0.15, "gguf": 0.05, "nf4": 0.4}


def install_forge_modules(monkeypatch, sd_model, calls: list) -> None:
    """Forge's `modules` (sd_models, shared, call_queue) with `sd_model` loaded, as ForgeHost reads them (mocked:
    no Forge here); the `backend_modules` stand-ins must be installed first. Appends "reload", "begin:…", "end" and
    "empty_cache" to `calls`."""
    import sys
    import threading

    from lora_trainer.webui import forge

    state = SimpleNamespace(interrupted=False, stopping_generation=False, textinfo=None, job=None,
                            begin=lambda job: calls.append(f"begin:{job}"), end=lambda: calls.append("end"))
    mods = {
        "modules_forge": types.ModuleType("modules_forge"),
        "modules": types.ModuleType("modules"),
        "modules.sd_models": SimpleNamespace(forge_model_reload=lambda: (calls.append("reload"), (sd_model, False))[1],
                                             model_data=SimpleNamespace(sd_model=sd_model)),
        "modules.shared": SimpleNamespace(state=state, sd_model=sd_model, opts=SimpleNamespace(),
                                          cmd_opts=SimpleNamespace(lora_dir="/webui/models/Lora")),
        "modules.call_queue": SimpleNamespace(queue_lock=threading.Lock()),
    }
    mods["modules_forge"].__spec__ = SimpleNamespace(name="x")
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for sub in ("sd_models", "shared", "call_queue"):
        monkeypatch.setattr(mods["modules"], sub, mods[f"modules.{sub}"], raising=False)
    mm = sys.modules["backend.memory_management"]
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda: calls.append("empty_cache")
    monkeypatch.setattr(forge, "_importable", lambda name: name.split(".")[0] in ("modules_forge", "backend"))
