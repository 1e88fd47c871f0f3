"""Our LDM -> diffusers conversion against independent implementations:

* diffusers' own single-file converters (`diffusers.loaders.single_file_utils`, same signatures in
  0.29-0.42 for the functions used here);
* the original LDM code (`ldm` package from PyPI's `stable-diffusion-sdkit`, which wraps
  Stability-AI/stablediffusion): a tiny `UNetModel` / VAE `Encoder`/`Decoder` built from our yaml must
  load the checkpoint strictly and compute what our diffusers modules compute. Skipped when `ldm`
  is not importable. Install it as tests/test_webui_a1111_ldm.py says (`pip install --no-deps --target
  DIR stable-diffusion-sdkit==2.1.5 einops omegaconf==2.3.0 antlr4-python3-runtime==4.9.3`, then
  `LORA_TRAINER_LDM_PATH=DIR`) or into the venv.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

from lora_trainer.models.ldm_convert import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    canonical_text_keys,
    fit_shape,
    vae_to_diffusers,
)
from lora_trainer.models.loader import load_model, read_checkpoint
from lora_trainer.models.tiny import write_tiny_checkpoint

_LDM_PATH = os.environ.get("LORA_TRAINER_LDM_PATH")
if _LDM_PATH and _LDM_PATH not in sys.path:
    sys.path.append(_LDM_PATH)  # appended: never shadows the venv's own packages

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    cache = {}

    def get(family, prediction="epsilon", conv=False):
        key = (family, prediction, conv)
        if key not in cache:
            path = write_tiny_checkpoint(folder, family, prediction, conv_projection=conv)
            cache[key] = (path, read_checkpoint(path), load_model(path))
        return cache[key]

    return get


def _assert_same(ours: dict, reference: dict, keys=None) -> None:
    keys = set(ours) if keys is None else keys
    assert keys <= set(reference), sorted(keys - set(reference))[:5]
    for k in keys:
        assert torch.equal(fit_shape(ours[k], reference[k].shape), reference[k]), k


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_vae_matches_diffusers_converter(tiny, family):
    _, sd, bundle = tiny(family)
    reference = single_file_utils.convert_ldm_vae_checkpoint(sd, dict(bundle.vae.config))
    cfg = bundle.vae.config
    ours = vae_to_diffusers(sd, len(cfg.block_out_channels), cfg.layers_per_block, prefix=VAE_PREFIX)
    assert set(ours) == set(reference)
    _assert_same(ours, reference)


def test_clip_matches_diffusers_converter(tiny):
    _, sd, bundle = tiny("sd1")
    reference = single_file_utils.convert_ldm_clip_checkpoint(
        {k: v for k, v in sd.items() if k.startswith(SD1_TEXT_PREFIX)})
    ours = canonical_text_keys(bundle.text_encoders[0].state_dict())
    ours.pop("text_model.embeddings.position_ids", None)
    _assert_same(ours, reference)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_open_clip_matches_diffusers_converter(tiny, family):
    _, sd, bundle = tiny(family)
    te = bundle.text_encoders[-1]
    prefix = SD2_TEXT_PREFIX if family == "sd2" else SDXL_TEXT2_PREFIX
    reference = single_file_utils.convert_open_clip_checkpoint(te, sd, prefix=prefix)
    ours = canonical_text_keys(te.state_dict())
    ours.pop("text_model.embeddings.position_ids", None)
    _assert_same(ours, reference)
    if family == "sd2":  # the file's last layer is the one SD2 never uses: we leave it out
        n = te.config.num_hidden_layers
        assert any(f"encoder.layers.{n}." in k for k in reference)
        assert not any(f"encoder.layers.{n}." in k for k in ours)


# ---------------------------------------------------------------- original LDM code
def _ldm():
    pytest.importorskip("einops", reason="original LDM code not installed (see the module docstring)")
    return pytest.importorskip("ldm.modules.diffusionmodules.openaimodel",
                               reason="original LDM code not installed (see the module docstring)")


@pytest.mark.parametrize("family, prediction, conv", [
    ("sd1", "epsilon", False), ("sd2", "v_prediction", False), ("sd2", "v_prediction", True)])
def test_unet_matches_original_ldm_code(tiny, family, prediction, conv):
    openaimodel = _ldm()
    path, sd, bundle = tiny(family, prediction, conv)
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]["params"]
    ldm_unet = openaimodel.UNetModel(**params).eval()
    ldm_unet.load_state_dict({k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)},
                             strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, params["context_dim"], generator=g)
    with torch.no_grad():
        want = ldm_unet(x, timesteps=t, context=ctx)
        got = bundle.unet(x, t, ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_vae_matches_original_ldm_code(tiny):
    _ldm()
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    path, sd, bundle = tiny("sd1")
    dd = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]["first_stage_config"]["params"][
        "ddconfig"]
    encoder, decoder = Encoder(**dd).eval(), Decoder(**dd).eval()
    quant = torch.nn.Conv2d(2 * dd["z_channels"], 2 * dd["z_channels"], 1)
    post_quant = torch.nn.Conv2d(dd["z_channels"], dd["z_channels"], 1)
    for name, module in (("encoder.", encoder), ("decoder.", decoder), ("quant_conv.", quant),
                         ("post_quant_conv.", post_quant)):
        module.load_state_dict({k[len(VAE_PREFIX + name):]: v for k, v in sd.items()
                                if k.startswith(VAE_PREFIX + name)}, strict=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_mean = quant(encoder(image))[:, : dd["z_channels"]]
        got_mean = bundle.vae.encode(image).latent_dist.mean
        torch.testing.assert_close(got_mean, want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bundle.vae.decode(got_mean).sample, decoder(post_quant(want_mean)),
                                   rtol=1e-4, atol=1e-5)
