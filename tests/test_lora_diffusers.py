"""Our kohya files, loaded by a real third-party loader (diffusers' `load_lora_weights`), must
reproduce our peft model's UNet and text-encoder outputs, with every key used."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

from lora_trainer.lora import LoraSpec, inject_lora, load_kohya_file
from lora_trainer.models.bundle import Family
from lora_trainer.models.tiny import _randomize, build_tiny_bundle, unet_config

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import USE_PEFT_BACKEND

# Verified: diffusers 0.31.0 (Forge stack) and 0.42.1 load every case below, LoCon conv keys
# (ResNet conv1/conv2/time_emb_proj/conv_shortcut, down/upsamplers, SDXL's SGM names) included.
# diffusers 0.29.2 on A1111's stack (transformers 4.30.2) cannot load any LoRA (see the skip);
# there its kohya converter is still checked (test_diffusers_029_converter_...).
needs_peft_backend = pytest.mark.skipif(
    not USE_PEFT_BACKEND,
    reason=f"diffusers {diffusers.__version__} turns its PEFT backend off with this transformers version "
    "(it needs transformers >= 4.34), and load_lora_weights raises 'PEFT backend is required' without it",
)


_BUNDLES: dict = {}


def _bundle(family: str, conv_proj: bool = False):
    """A fresh copy of a cached tiny bundle (building one costs more than copying it)."""
    key = (family, conv_proj)
    if key not in _BUNDLES:
        _BUNDLES[key] = _build(family, conv_proj)
    return copy.deepcopy(_BUNDLES[key])


def _build(family: str, conv_proj: bool):
    bundle = build_tiny_bundle(family, seed=1)
    if conv_proj:  # SD2 with 1x1-conv proj_in/proj_out (SD2 checkpoints come both ways)
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**{**unet_config(Family(family)), "use_linear_projection": False})
        _randomize(unet, torch.Generator().manual_seed(3))
        bundle.unet = unet.eval().requires_grad_(False)
    return bundle


def _pipeline(bundle, unet, text_encoders):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDPMScheduler(**bundle.schedule.scheduler_config(), steps_offset=1, clip_sample=False)
    common = {"vae": bundle.vae, "unet": unet, "scheduler": scheduler}
    if bundle.family is Family.SDXL:
        return StableDiffusionXLPipeline(text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], **common)
    return StableDiffusionPipeline(text_encoder=text_encoders[0], tokenizer=bundle.tokenizers[0],
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                   **common)


def _unet_out(unet, bundle, g):
    ctx = unet.config.cross_attention_dim
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, ctx, generator=g)
    kwargs = {}
    if bundle.family is Family.SDXL:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, bundle.text_encoders[1].config.projection_dim, generator=g),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), hidden, **kwargs).sample


def _te_outs(te, g):
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    outs = list(out.hidden_states[1:])
    if getattr(out, "text_embeds", None) is not None:
        outs.append(out.text_embeds)
    return outs


def _count_lora_layers(module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


CASES = [
    # (family, conv proj_in/out, train TE, LoCon)
    ("sd1", False, True, False),
    ("sd1", False, False, False),
    ("sd1", False, True, True),
    ("sd2", False, True, False),
    ("sd2", True, True, False),
    ("sd2", True, False, True),
    ("sdxl", False, True, False),
    ("sdxl", False, False, False),
    ("sdxl", False, True, True),
]


@needs_peft_backend
@pytest.mark.parametrize("family,conv_proj,train_te,locon", CASES,
                         ids=[f"{f}{'-convproj' if c else ''}{'-te' if t else '-unetonly'}{'-locon' if lc else ''}"
                              for f, c, t, lc in CASES])
def test_diffusers_load_lora_weights_reproduces_our_outputs(tmp_path, family, conv_proj, train_te, locon):
    bundle = _bundle(family, conv_proj)
    base_unet = copy.deepcopy(bundle.unet)
    base_tes = [copy.deepcopy(te) for te in bundle.text_encoders]
    g0 = torch.Generator().manual_seed(0)
    base_unet_out = _unet_out(base_unet, bundle, g0)
    base_te_out = _te_outs(base_tes[0], torch.Generator().manual_seed(1))[-1]

    spec = LoraSpec(rank=4, alpha=2.0, conv_rank=2 if locon else None, conv_alpha=3.0 if locon else None,
                    train_text_encoder=train_te)
    net = inject_lora(bundle, spec, seed=0)
    with torch.no_grad():  # non-zero lora_up too, so every module changes the output
        gen = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path / "lora.safetensors"
    net.save_kohya(path, {"ss_network_module": "networks.lora"}, dtype=torch.float32)
    saved_keys = set(load_kohya_file(path)[0])

    pipe = _pipeline(bundle, base_unet, base_tes)
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
    problems = [m for m in capture.messages + [str(w.message) for w in caught]
                if any(s in m.lower() for s in ("unexpected", "missing", "not found", "ignored", "not used"))
                # diffusers' note that a UNet-only file has no text-encoder keys: true and harmless
                and not (not train_te and m.startswith("No LoRA keys associated to CLIPTextModel"))]
    assert not problems, problems

    # every module we wrote became an adapter in diffusers' model (all keys consumed)
    unet_targets = [t for t in net.targets if t.component == "unet"]
    assert _count_lora_layers(pipe.unet) == len(unet_targets)
    te_components = [c for c in net.components() if c != "unet"]
    for i, te in enumerate(base_tes):
        expected = sum(t.component == te_components[i] for t in net.targets) if te_components else 0
        assert _count_lora_layers(te) == expected
    assert len(saved_keys) == 3 * len(net.targets)

    ours = _unet_out(bundle.unet, bundle, torch.Generator().manual_seed(0))
    theirs = _unet_out(pipe.unet, bundle, torch.Generator().manual_seed(0))
    assert (ours - base_unet_out).abs().max() > 1e-2, "the LoRA should change the UNet output"
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    for ours_te, theirs_te in zip(bundle.text_encoders, base_tes):
        for a, b in zip(_te_outs(ours_te, torch.Generator().manual_seed(1)),
                        _te_outs(theirs_te, torch.Generator().manual_seed(1))):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    te_diff = (_te_outs(bundle.text_encoders[0], torch.Generator().manual_seed(1))[-1] - base_te_out).abs().max()
    assert (te_diff > 1e-3) == train_te, "the LoRA should change the text encoder output iff it trains it"


@pytest.mark.skipif(USE_PEFT_BACKEND, reason="covered by the full load_lora_weights test on this stack")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_converter_maps_every_key_to_the_right_module(tmp_path, family):
    """Where diffusers cannot load LoRAs at all (0.29.2 + transformers 4.30), its kohya converter
    (`lora_state_dict`) must still turn every key we write, LoCon included, into the diffusers
    module we trained, with the same tensors and one alpha per module."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    bundle = _bundle(family)
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0), seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    path = tmp_path / "lora.safetensors"
    net.save_kohya(path, {}, dtype=torch.float32)
    pipe_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {"unet_config": bundle.unet.config} if family == "sdxl" else {}
    state, alphas = pipe_cls.lora_state_dict(str(tmp_path), weight_name=path.name, **kwargs)

    prefixes = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}
    converted = {"unet": convert_unet_state_dict_to_peft({k[5:]: v for k, v in state.items() if k.startswith("unet.")})}
    for component in net.components():
        if component != "unet":
            pre = prefixes[component]
            part = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
            converted[component] = convert_state_dict_to_peft(part)
    seen = 0
    for t in net.targets:
        sd = converted[t.component]
        layer = net.layers[t.kohya_name]
        assert torch.equal(sd.pop(f"{t.module_name}.lora_A.weight"), layer.lora_A["kohya"].weight), t.kohya_name
        assert torch.equal(sd.pop(f"{t.module_name}.lora_B.weight"), layer.lora_B["kohya"].weight), t.kohya_name
        seen += 1
    assert all(not sd for sd in converted.values()), {c: list(sd)[:3] for c, sd in converted.items()}
    assert seen == len(net.targets) and len(alphas) == len(net.targets)
    assert sorted(set(alphas.values())) == [2.0, 3.0]
