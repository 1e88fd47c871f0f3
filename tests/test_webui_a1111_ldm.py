"""A1111Host's model hand-off against real LDM modules (no WebUI needed).

The `ldm` package comes from PyPI's stable-diffusion-sdkit (the Stability-AI/stablediffusion code
A1111 runs). Install it beside the test venv without its dependencies, e.g.
`pip install --no-deps --target DIR stable-diffusion-sdkit==2.1.5 einops omegaconf==2.3.0
antlr4-python3-runtime==4.9.3` and set
`LORA_TRAINER_LDM_PATH=DIR`; the tests skip when `ldm` is not importable.

What is real: the LDM UNet (`ldm...openaimodel.UNetModel`), the LDM VAE encoder/decoder
(`ldm...model.Encoder/Decoder`), the CLIP text model, our conversion and the real training engine.
What stands in: `LatentDiffusion` itself (its module imports pytorch_lightning/open_clip, which the
test venvs don't have) is replaced by a plain `nn.Module` holding the same sub-modules under the same
attribute names, including A1111's `.wrapped` hijack level; and the built-in Lora extension's restore
function (it lives in the WebUI, not on PyPI) by a copy of its semantics.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

_LDM_PATH = os.environ.get("LORA_TRAINER_LDM_PATH")
if _LDM_PATH and _LDM_PATH not in sys.path:
    sys.path.append(_LDM_PATH)  # appended: never shadows the venv's own packages
pytest.importorskip("einops")
openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
ldm_vae = pytest.importorskip("ldm.modules.diffusionmodules.model")

from lora_trainer.models.tiny import write_tiny_checkpoint
from lora_trainer.webui.a1111 import (
    A1111Host,
    LoraPatchedError,
    ldm_state_dict,
    model_facts,
    restore_lora_patches,
)
from lora_trainer.webui.common import tensor_fingerprint


class _Wrapped(torch.nn.Module):
    """A1111's sd_hijack wrappers keep the original module as `.wrapped`."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)


def _build_ldm_like(ckpt_path, yaml_path):
    """LatentDiffusion's sub-modules, built by ldm from the checkpoint's yaml and loaded strictly."""
    import yaml
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    with open(yaml_path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)["model"]["params"]
    m = torch.nn.Module()
    m.model = torch.nn.Module()
    m.model.diffusion_model = openaimodel.UNetModel(**cfg["unet_config"]["params"])
    fs = cfg["first_stage_config"]["params"]
    m.first_stage_model = torch.nn.Module()
    m.first_stage_model.encoder = ldm_vae.Encoder(**fs["ddconfig"])
    m.first_stage_model.decoder = ldm_vae.Decoder(**fs["ddconfig"])
    z = fs["ddconfig"]["z_channels"]
    m.first_stage_model.quant_conv = torch.nn.Conv2d(2 * z, 2 * fs["embed_dim"], 1)
    m.first_stage_model.post_quant_conv = torch.nn.Conv2d(fs["embed_dim"], z, 1)
    version = cfg["cond_stage_config"]["params"]["version"]
    embedder = torch.nn.Module()  # FrozenCLIPEmbedder: .transformer is a CLIPTextModel
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(version))
    if hasattr(clip, "text_model"):  # transformers < 5: the checkpoint layout (transformer.text_model.*)
        embedder.transformer = clip
    else:  # transformers 5 dropped the .text_model level; keep the checkpoint's names
        embedder.transformer = torch.nn.Module()
        embedder.transformer.text_model = clip
    m.__dict__["clip"] = clip  # what to call in the output comparison (not a registered child)
    sd = load_file(str(ckpt_path))
    sd.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)
    m.cond_stage_model = embedder
    own = m.state_dict()
    loadable = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in loadable and not k.endswith("position_ids")]
    assert not missing, missing[:5]
    m.load_state_dict(loadable, strict=False)
    # then hijack the way A1111 does: cond_stage_model.wrapped..., token_embedding.wrapped
    emb = embedder.transformer.text_model.embeddings
    emb.token_embedding = _Wrapped(emb.token_embedding)
    m.cond_stage_model = _Wrapped(embedder)
    m.linear_start, m.linear_end, m.num_timesteps = cfg["linear_start"], cfg["linear_end"], cfg["timesteps"]
    m.scale_factor, m.parameterization = cfg["scale_factor"], cfg.get("parameterization", "eps")
    m.is_sd1, m.is_sd2, m.is_sdxl = True, False, False
    m.used_config = str(yaml_path)
    m.sd_checkpoint_info = SimpleNamespace(filename=str(ckpt_path), model_name=ckpt_path.stem)
    return m.eval()


@pytest.fixture(scope="module")
def ldm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = write_tiny_checkpoint(folder, "sd1", seed=3)
    return _build_ldm_like(ckpt, ckpt.with_suffix(".yaml"))


def _bundle(model):
    facts = model_facts(model, SimpleNamespace(CLIP_stop_at_last_layers=1))
    return A1111Host.bundle_from_model(model, facts), facts


def test_state_dict_names_match_the_checkpoint_and_share_storage(ldm_model):
    state = ldm_state_dict(ldm_model)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert not any(".wrapped." in k for k in state)
    unet_w = ldm_model.model.diffusion_model.input_blocks[0][0].weight
    assert state["model.diffusion_model.input_blocks.0.0.weight"].data_ptr() == unet_w.data_ptr()


def test_facts_come_from_the_loaded_model(ldm_model):
    facts = model_facts(ldm_model, SimpleNamespace(CLIP_stop_at_last_layers=2))
    assert (facts.family, facts.prediction_type, facts.clip_skip) == ("SD1", "epsilon", 2)
    assert facts.scale_factor == pytest.approx(ldm_model.scale_factor)
    assert (facts.linear_start, facts.linear_end, facts.num_timesteps) == (0.00085, 0.012, 1000)


@torch.no_grad()
def test_conversion_gives_the_same_unet_vae_and_text_outputs_without_copying(ldm_model):
    bundle, _ = _bundle(ldm_model)
    host_ptrs = {t.data_ptr() for t in ldm_state_dict(ldm_model).values()}
    ours = [p for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters()]
    assert all(p.data_ptr() in host_ptrs for p in ours)  # every weight is the host's storage
    g = torch.Generator().manual_seed(0)
    ctx_dim = ldm_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([321]), torch.randn(1, 5, ctx_dim, generator=g)
    ref = ldm_model.model.diffusion_model(x, t, context=ctx)
    out = bundle.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    img = torch.randn(1, 3, 32, 32, generator=g)
    fs = ldm_model.first_stage_model
    moments = fs.quant_conv(fs.encoder(img))
    torch.testing.assert_close(bundle.vae.encode(img).latent_dist.mean, moments[:, :4], rtol=1e-4, atol=1e-5)
    z = torch.randn(1, 4, 4, 4, generator=g)
    torch.testing.assert_close(bundle.vae.decode(z).sample, fs.decoder(fs.post_quant_conv(z)), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    torch.testing.assert_close(bundle.text_encoders[0](ids)[0], ldm_model.clip(ids)[0])


def test_training_leaves_the_ldm_weights_bit_identical(ldm_model, tmp_path):
    from PIL import Image

    from lora_trainer.config import TrainConfig
    from lora_trainer.train import run_training

    data = tmp_path / "img" / "2_sks"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200 - 60 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("sks, photo")
    state = ldm_state_dict(ldm_model)
    before = tensor_fingerprint(state)
    ptrs = {k: t.data_ptr() for k, t in state.items()}
    bundle, _ = _bundle(ldm_model)
    shared_during: list[bool] = []

    def on_event(ev):
        if getattr(ev, "kind", "") == "step":  # storage still shared while training runs
            conv_in = getattr(bundle.unet.conv_in, "base_layer", bundle.unet.conv_in)  # peft may wrap it
            shared_during.append(conv_in.weight.data_ptr() == ptrs["model.diffusion_model.input_blocks.0.0.weight"])

    config = TrainConfig(data=str(tmp_path / "img"), output_dir=str(tmp_path / "out"), name="ldm-test",
                         resolution=64, enable_bucket=False, max_steps=2, batch_size=1, rank=2, alpha=1, save_state=False,
                         device="cpu", seed=1)
    result = run_training(config, bundle=bundle, on_event=on_event)
    assert result.lora_path and os.path.exists(result.lora_path)
    assert shared_during and all(shared_during)
    after_state = ldm_state_dict(ldm_model)
    assert tensor_fingerprint(after_state) == before
    assert {k: t.data_ptr() for k, t in after_state.items()} == ptrs
    assert all(t.device.type == "cpu" for t in after_state.values())


class _FakeNetworks:
    """Stand-in for A1111's extensions-builtin/Lora/networks.py restore (same semantics: copy the CPU
    backup back into the weight); the real one runs in the integration suite."""

    @staticmethod
    def network_restore_weights_from_backup(module):
        backup = getattr(module, "network_weights_backup", None)
        if backup is not None:
            module.weight.copy_(backup)
        bias = getattr(module, "network_bias_backup", None)
        if bias is not None:
            module.bias.copy_(bias)


def test_lora_patched_weights_are_restored_before_training(ldm_model):
    # Called outside no_grad, as from the job thread: weights are leaf tensors that require grad.
    layer = ldm_model.model.diffusion_model.input_blocks[1][1].proj_in
    assert layer.weight.requires_grad
    original = layer.weight.detach().clone()
    layer.network_weights_backup = original.clone()
    layer.network_bias_backup = layer.bias.detach().clone() if layer.bias is not None else None
    with torch.no_grad():
        layer.weight.add_(0.5)  # what <lora:x:1> leaves merged in the weights after a generation
    layer.network_current_names = (("x", 1.0, 1.0, None),)
    assert restore_lora_patches(ldm_model, _FakeNetworks()) == 1
    assert torch.equal(layer.weight, original)
    assert layer.network_current_names == ()
    # without the extension's restore function: refuse with a message
    with torch.no_grad():
        layer.weight.add_(0.5)
    layer.network_current_names = (("x", 1.0, 1.0, None),)
    with pytest.raises(LoraPatchedError, match="generate one image"):
        restore_lora_patches(ldm_model, SimpleNamespace())
    with torch.no_grad():
        _FakeNetworks.network_restore_weights_from_backup(layer)
    layer.network_current_names = ()
    assert torch.equal(layer.weight, original)


def _tree_from(state, prefix):
    """Raw tensors under `prefix` as a module tree (OpenCLIP's text tower needs open_clip, which the
    test venvs lack; our OpenCLIP conversion itself is tested in the models tests)."""
    root = torch.nn.Module()
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        *path, leaf = key[len(prefix):].split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return root


@torch.no_grad()
def test_sd2_v_prediction_model_facts_and_unet_outputs(tmp_path):
    import yaml
    from safetensors.torch import load_file

    ckpt = write_tiny_checkpoint(tmp_path, "sd2", prediction_type="v_prediction", seed=5)
    with open(ckpt.with_suffix(".yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)["model"]["params"]
    sd = load_file(str(ckpt))
    m = torch.nn.Module()
    m.model = torch.nn.Module()
    m.model.diffusion_model = openaimodel.UNetModel(**cfg["unet_config"]["params"])
    m.model.diffusion_model.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in sd.items()
                                             if k.startswith("model.diffusion_model.")})
    m.first_stage_model = _tree_from(sd, "first_stage_model.")
    m.cond_stage_model = _Wrapped(torch.nn.Module())  # A1111: FrozenOpenCLIPEmbedderWithCustomWords
    m.cond_stage_model.wrapped.model = _tree_from(sd, "cond_stage_model.model.")
    m.linear_start, m.linear_end, m.num_timesteps = cfg["linear_start"], cfg["linear_end"], cfg["timesteps"]
    m.scale_factor, m.parameterization = cfg["scale_factor"], cfg["parameterization"]
    m.is_sd1, m.is_sd2, m.is_sdxl = False, True, False
    m.used_config = str(ckpt.with_suffix(".yaml"))
    m.sd_checkpoint_info = SimpleNamespace(filename=str(ckpt), model_name=ckpt.stem)
    bundle, facts = _bundle(m.eval())
    assert (facts.family, facts.prediction_type) == ("SD2", "v_prediction")
    assert bundle.prediction_type == "v_prediction" and bundle.family.label == "SD2"
    ctx_dim = cfg["unet_config"]["params"]["context_dim"]
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 5, ctx_dim, generator=g)
    torch.testing.assert_close(bundle.unet(x, t, encoder_hidden_states=ctx).sample,
                               m.model.diffusion_model(x, t, context=ctx), rtol=1e-4, atol=1e-5)
