"""CLIP text encoders are built under the meta device with transformers >= 5 (build.empty_text_encoder): the same
module as the old build (parameters on the meta device, real buffers), the same weights once loaded, the same
outputs. With older transformers the old build stays (the tests then compare it with itself)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.models import build
from lora_trainer.models.bundle import Family
from lora_trainer.models.ldm_config import ModelConfig
from lora_trainer.models.loader import load_model
from lora_trainer.models.tiny import write_tiny_checkpoint


def _old_build(config, with_projection: bool):
    """The construction before: accelerate's init_empty_weights (parameters only) around transformers' own."""
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return build.empty_module(lambda: cls(te_config))


@pytest.mark.parametrize("family, index", [(Family.SD1, 0), (Family.SDXL, 0), (Family.SDXL, 1)])
def test_meta_built_clip_is_the_old_module(family, index):
    config = dict(ModelConfig.bundled(family).text_encoders[index].config)
    with_projection = family is Family.SDXL and index == 1
    new, old = build.empty_text_encoder(config, with_projection), _old_build(config, with_projection)
    assert type(new) is type(old)
    assert list(new.state_dict()) == list(old.state_dict())
    params_new, params_old = dict(new.named_parameters()), dict(old.named_parameters())
    assert list(params_new) == list(params_old)
    assert all(p.is_meta and p.shape == params_old[n].shape and p.dtype == params_old[n].dtype
               for n, p in params_new.items())
    buffers_new, buffers_old = dict(new.named_buffers()), dict(old.named_buffers())
    assert list(buffers_new) == list(buffers_old) and buffers_new
    for name, b in buffers_new.items():
        o = buffers_old[name]
        assert not b.is_meta and b.dtype == o.dtype and b.shape == o.shape and b.stride() == o.stride()
        assert torch.equal(b, o)


def test_loaded_text_encoder_encodes_as_before(tmp_path, monkeypatch):
    ckpt = write_tiny_checkpoint(tmp_path, "sd1", seed=2)
    new = load_model(ckpt, dtype=torch.float32, device="cpu")
    monkeypatch.setattr(build, "empty_text_encoder", _old_build)
    old = load_model(ckpt, dtype=torch.float32, device="cpu")
    te_new, te_old = new.text_encoders[0], old.text_encoders[0]
    assert te_new.state_dict().keys() == te_old.state_dict().keys()
    assert all(torch.equal(v, te_old.state_dict()[k]) for k, v in te_new.state_dict().items())
    ids = new.tokenizers[0](["a red circle", "two squares"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(te_new(ids).last_hidden_state, te_old(ids).last_hidden_state)


def test_older_transformers_keep_the_old_build():
    import transformers

    assert build._skips_init_on_meta() == (int(transformers.__version__.split(".")[0]) >= 5)


def test_an_unknown_meta_buffer_is_refused():
    with torch.device("meta"):
        module = torch.nn.BatchNorm1d(4)
    assert not build._real_position_ids(module)  # running_mean etc.: the caller builds it the old way
