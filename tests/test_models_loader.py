"""Loading tiny checkpoints: file formats round-trip, file path == in-memory state dict, zero copy,
and a same-named .yaml overriding the model parameters as in A1111."""

from __future__ import annotations

import shutil
from functools import cache

import pytest
import torch
import yaml

from lora_trainer.models import Family
from lora_trainer.models.ldm_convert import canonical_text_keys
from lora_trainer.models.loader import bundle_from_ldm_state_dict, load_model, read_checkpoint
from lora_trainer.models.tiny import build_tiny_bundle, write_tiny_checkpoint

CASES = [  # family, prediction, conv projection, formats
    ("sd1", "epsilon", False, ("safetensors", "ckpt", "diffusers")),
    ("sd2", "epsilon", False, ("safetensors",)),
    ("sd2", "v_prediction", False, ("safetensors", "ckpt", "diffusers")),
    ("sd2", "v_prediction", True, ("safetensors",)),
    ("sdxl", "epsilon", False, ("safetensors", "ckpt", "diffusers")),
]
PARAMS = [pytest.param(f, p, c, fmt, id=f"{f}-{p}{'-conv' if c else ''}-{fmt}")
          for f, p, c, fmts in CASES for fmt in fmts]


@cache
def reference_bundle(family: str, prediction: str = "epsilon", seed: int = 0, conv: bool = False):
    return build_tiny_bundle(family, prediction, seed=seed, conv_projection=conv)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return canonical_text_keys({k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")})


def assert_same_modules(a, b) -> None:
    for (name, m1), (_, m2) in zip(a.modules().items(), b.modules().items(), strict=True):
        w1, w2 = _weights(m1), _weights(m2)
        assert w1.keys() == w2.keys(), name
        for k in w1:
            assert w1[k].dtype == w2[k].dtype and torch.equal(w1[k], w2[k]), f"{name}.{k}"


@torch.no_grad()
def outputs(bundle) -> list[torch.Tensor]:
    """Text encoders, UNet and VAE outputs: proves configs (heads, activations) match, not only weights."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    hidden = [te(ids, output_hidden_states=True) for te in bundle.text_encoders]
    if bundle.is_sdxl:
        ctx = torch.cat([h.hidden_states[-2] for h in hidden], dim=-1)
        extra = {"added_cond_kwargs": {"text_embeds": hidden[1].text_embeds, "time_ids": torch.zeros(1, 6)}}
    else:
        ctx, extra = hidden[0].last_hidden_state, {}
    x = torch.randn(1, 4, 8, 8, generator=g)
    eps = bundle.unet(x, torch.tensor([500]), ctx, **extra).sample
    latents = bundle.vae.encode(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).latent_dist.mean
    return [ctx, eps, latents, bundle.vae.decode(latents).sample]


def _cfg(config, key):
    value = getattr(config, key, None)
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("family, prediction, conv, fmt", PARAMS)
def test_round_trip_gives_the_bundle_it_was_written_from(ckpt_dir, family, prediction, conv, fmt):
    path = write_tiny_checkpoint(ckpt_dir / fmt, family, prediction, fmt=fmt, seed=3, conv_projection=conv)
    loaded = load_model(path)
    reference = reference_bundle(family, prediction, 3, conv)
    assert loaded.family is Family(family)
    assert loaded.prediction_type == prediction
    assert loaded.scaling_factor == pytest.approx(reference.scaling_factor)
    assert loaded.schedule == reference.schedule
    assert loaded.unet.config.use_linear_projection == reference.unet.config.use_linear_projection
    assert len(loaded.tokenizers) == len(reference.tokenizers)
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in reference.tokenizers]
    assert_same_modules(loaded, reference)
    for name, module in loaded.modules().items():  # same architecture, not only the same weights
        for key in ("num_attention_heads", "hidden_act", "attention_head_dim", "transformer_layers_per_block",
                    "addition_time_embed_dim", "projection_dim", "layer_norm_eps"):
            want = _cfg(reference.modules()[name].config, key)
            assert _cfg(module.config, key) == want, (name, key)
    if fmt == "safetensors":  # outputs once per model; the other formats share the code after reading
        for got, want in zip(outputs(loaded), outputs(reference), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if fmt != "diffusers":
        assert loaded.name == path.stem and loaded.source == str(path)
        assert loaded.model_hash is not None and len(loaded.model_hash) == 64


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_file_and_in_memory_state_dict_give_identical_zero_copy_modules(ckpt_dir, family):
    path = write_tiny_checkpoint(ckpt_dir / "mem", family, "v_prediction" if family == "sd2" else "epsilon")
    from_file = load_model(path)
    # The WebUI hands over fp16 tensors already on its device: nothing may be copied.
    host = {k: v.half() if v.is_floating_point() else v for k, v in read_checkpoint(path).items()}
    before = {k: v.clone() for k, v in host.items()}
    in_memory = bundle_from_ldm_state_dict(host, config=path.with_suffix(".yaml"), name=path.stem)
    host_storages = {t.untyped_storage().data_ptr() for t in host.values()}
    for module in in_memory.modules().values():
        for pname, p in module.named_parameters():
            assert p.dtype == torch.float16, pname
            assert p.untyped_storage().data_ptr() in host_storages, f"{pname} was copied"
    # q/k/v of OpenCLIP are slices of one fused tensor, not three new ones.
    if family != "sd1":
        te = in_memory.text_encoders[-1]
        layer = (te.text_model if hasattr(te, "text_model") else te).encoder.layers[0].self_attn
        assert layer.q_proj.weight.untyped_storage().data_ptr() == layer.v_proj.weight.untyped_storage().data_ptr()
    for k, v in host.items():  # the host's weights are untouched
        assert torch.equal(v, before[k]), k
    # Same modules as loading the file (after the fp16 round trip of the host copy).
    in_memory32 = bundle_from_ldm_state_dict(read_checkpoint(path), config=path.with_suffix(".yaml"),
                                             name=path.stem)
    assert_same_modules(in_memory32, from_file)
    assert in_memory32.prediction_type == from_file.prediction_type
    assert in_memory32.schedule == from_file.schedule


def test_dtype_conversion_copies_only_what_it_must(ckpt_dir):
    path = write_tiny_checkpoint(ckpt_dir / "dtype", "sd1")
    sd = read_checkpoint(path)
    storages = {t.untyped_storage().data_ptr() for t in sd.values()}
    bundle = bundle_from_ldm_state_dict(sd, config=path.with_suffix(".yaml"), dtype=torch.float32)
    assert all(p.untyped_storage().data_ptr() in storages for p in bundle.unet.parameters())
    half = bundle_from_ldm_state_dict(sd, config=path.with_suffix(".yaml"), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.unet.parameters())
    assert load_model(path, dtype=torch.bfloat16).unet.conv_in.weight.dtype == torch.bfloat16


def test_a1111_hijacked_text_encoder_names_are_accepted(ckpt_dir):
    path = write_tiny_checkpoint(ckpt_dir / "hijack", "sd1")
    sd = read_checkpoint(path)
    hijacked = {k.replace("cond_stage_model.", "cond_stage_model.wrapped.")
                 .replace("token_embedding.", "token_embedding.wrapped."): v for k, v in sd.items()}
    bundle = bundle_from_ldm_state_dict(hijacked, config=path.with_suffix(".yaml"))
    assert_same_modules(bundle, reference_bundle("sd1"))


def _edit_yaml(path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data["model"]["params"])
    path.write_text(yaml.safe_dump(data))


def test_yaml_overrides_every_model_parameter(ckpt_dir):
    path = write_tiny_checkpoint(ckpt_dir / "yaml", "sd1")

    def edit(p):
        p.update(parameterization="v", scale_factor=0.2, linear_start=0.001, linear_end=0.02, timesteps=500)

    _edit_yaml(path.with_suffix(".yaml"), edit)
    bundle = load_model(path)
    assert bundle.prediction_type == "v_prediction"
    assert bundle.scaling_factor == pytest.approx(0.2)
    assert bundle.vae.config.scaling_factor == pytest.approx(0.2)
    assert (bundle.schedule.beta_start, bundle.schedule.beta_end, bundle.schedule.num_train_timesteps) == (
        pytest.approx(0.001), pytest.approx(0.02), 500)
    assert bundle.noise_scheduler().config.prediction_type == "v_prediction"


def test_sdxl_yaml_v_scaling_and_discretization(ckpt_dir):
    path = write_tiny_checkpoint(ckpt_dir / "sdxl-v", "sdxl", "v_prediction")
    bundle = load_model(path)
    assert bundle.prediction_type == "v_prediction"

    def edit(p):
        p["denoiser_config"]["params"]["discretization_config"]["params"]["linear_end"] = 0.015
        p["scale_factor"] = 0.5

    _edit_yaml(path.with_suffix(".yaml"), edit)
    bundle = load_model(path)
    assert bundle.schedule.beta_end == pytest.approx(0.015) and bundle.scaling_factor == pytest.approx(0.5)


def test_relative_text_encoder_version_is_found_beside_the_yaml(ckpt_dir, tmp_path, monkeypatch):
    path = write_tiny_checkpoint(ckpt_dir / "rel", "sd1")

    def edit(p):
        p["cond_stage_config"]["params"]["version"] = f"{path.stem}-text/text_encoder"

    _edit_yaml(path.with_suffix(".yaml"), edit)
    monkeypatch.chdir(tmp_path)
    assert_same_modules(load_model(path), reference_bundle("sd1"))


def test_text_encoder_version_from_the_local_hf_cache(ckpt_dir, tmp_path, monkeypatch):
    """A yaml without `version` means openai/clip-vit-large-patch14, read from the local cache only."""
    import huggingface_hub.constants as hf_constants

    path = write_tiny_checkpoint(ckpt_dir / "hub", "sd1")
    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copyfile(ckpt_dir / "hub" / f"{path.stem}-text" / "text_encoder" / "config.json",
                    snapshot / "config.json")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def edit(p):
        p["cond_stage_config"].pop("params")

    _edit_yaml(path.with_suffix(".yaml"), edit)
    assert_same_modules(load_model(path), reference_bundle("sd1"))


def test_sd2_yaml_layer_last_keeps_every_text_layer(ckpt_dir):
    path = write_tiny_checkpoint(ckpt_dir / "layer", "sd2")

    def edit(p):
        p["cond_stage_config"]["params"]["layer"] = "last"

    _edit_yaml(path.with_suffix(".yaml"), edit)
    te = load_model(path).text_encoders[0]
    assert te.config.num_hidden_layers == reference_bundle("sd2").text_encoders[0].config.num_hidden_layers + 1


def test_model_hashes(ckpt_dir):
    import hashlib

    from lora_trainer.models.loader import checkpoint_sha256, legacy_model_hash

    path = write_tiny_checkpoint(ckpt_dir / "hash", "sd1")
    data = path.read_bytes()
    assert checkpoint_sha256(path) == hashlib.sha256(data).hexdigest() == load_model(path).model_hash
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_diffusers_folder_with_only_fp16_variant(ckpt_dir):
    folder = write_tiny_checkpoint(ckpt_dir / "variant", "sd1", fmt="diffusers")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert_same_modules(load_model(folder), reference_bundle("sd1"))


def test_buffers_follow_the_hosts_device(ckpt_dir):
    """The WebUI's tensors live on its GPU; buffers we create (position_ids) must go there too.
    The meta device stands in for the GPU here (no data needed to check placement)."""
    path = write_tiny_checkpoint(ckpt_dir / "device", "sdxl")
    host = {k: v.to("meta") for k, v in read_checkpoint(path).items()}
    bundle = bundle_from_ldm_state_dict(host, config=path.with_suffix(".yaml"))
    for module in bundle.modules().values():
        assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}


def test_omegaconf_config_as_the_webui_holds_it(ckpt_dir):
    omegaconf = pytest.importorskip("omegaconf")
    path = write_tiny_checkpoint(ckpt_dir / "omega", "sdxl", "v_prediction")
    config = omegaconf.OmegaConf.load(path.with_suffix(".yaml"))  # ListConfig/DictConfig values
    bundle = bundle_from_ldm_state_dict(read_checkpoint(path), config=config)
    assert bundle.prediction_type == "v_prediction"
    assert_same_modules(bundle, reference_bundle("sdxl", "v_prediction"))
