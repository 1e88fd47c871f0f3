"""TrainConfig: TOML/JSON round trip, presets, and every bad setting failing fast with a clear message."""

from __future__ import annotations

import importlib.util
import json

import pytest
from train_support import make_dataset, tiny_config

from lora_trainer.config import PRESETS, TrainConfig
from lora_trainer.errors import ConfigError, MissingPackageError
from lora_trainer.train.optim import build_optimizer, build_scheduler, check_optimizer_available


@pytest.fixture()
def data(tmp_path):
    return make_dataset(tmp_path / "d", n=1)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip(tmp_path, data, suffix):
    config = tiny_config(data, tmp_path / "o", sample_prompts=["a, b"], optimizer_args={"betas": [0.9, 0.99]})
    path = config.save(tmp_path / f"settings{suffix}")
    assert TrainConfig.load(path) == config


def test_toml_train_table_and_string_coercion(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[train]\nrank = "8"\nflip_aug = "yes"\nlearning_rate = 2e-4\n', encoding="utf-8")
    config = TrainConfig.load(path)
    assert (config.rank, config.flip_aug, config.learning_rate) == (8, True, 2e-4)


def test_unknown_key_and_bad_syntax(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"rnak": 4}), encoding="utf-8")
    with pytest.raises(ConfigError, match="Unknown setting.*rnak"):
        TrainConfig.load(tmp_path / "a.json")
    (tmp_path / "b.toml").write_text("rank = = 4", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        TrainConfig.load(tmp_path / "b.toml")


def test_presets_state_vram_and_apply():
    labels = [p.label for p in PRESETS.values()]
    assert "SDXL low-VRAM — 8 GB" in labels and "SD1.5 — 6 GB" in labels and "SDXL — 12 GB" in labels
    config = TrainConfig().with_preset("sdxl-lowvram")
    assert config.resolution == 1024 and config.gradient_checkpointing and not config.train_text_encoder
    assert TrainConfig.from_dict({"preset": "sdxl", "rank": 4}).rank == 4  # explicit settings win
    with pytest.raises(ConfigError, match="Unknown preset"):
        TrainConfig().with_preset("huge")


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank must be at least 1"),
    ({"learning_rate": 0.0}, "learning_rate must be greater than 0"),
    ({"learning_rate": -1e-4}, "learning_rate must be greater than 0"),
    ({"epochs": 0, "max_steps": 0}, "zero steps"),
    ({"name": "../evil"}, "path separator or '..'"),
    ({"name": "sub/dir"}, "path separator or '..'"),
    ({"name": "a\\b"}, "path separator or '..'"),
    ({"name": ""}, "name is empty"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"optimizer": "SGD"}, "optimizer 'SGD' is not supported"),
    ({"mixed_precision": "fp8"}, "mixed_precision 'fp8'"),
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate must be in"),
    ({"resolution": 500}, "multiple of 8"),
    ({"sample_every_n_epochs": 1}, "no sample prompt"),
    ({"min_timestep": 500, "max_timestep": 100}, "Timestep range"),
])
def test_bad_settings(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        tiny_config(data, tmp_path / "o", **overrides).validate(need_model=False)


def test_missing_model_and_data(tmp_path, data):
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_config(data, tmp_path / "o", model=str(tmp_path / "nope.safetensors")).validate()
    with pytest.raises(ConfigError, match="No base model"):
        tiny_config(data, tmp_path / "o").validate()
    with pytest.raises(ConfigError, match="Dataset folder .* does not exist"):
        tiny_config(tmp_path / "missing", tmp_path / "o").validate(need_model=False)


@pytest.mark.parametrize("name, package", [("Prodigy", "prodigyopt"), ("Lion8bit", "bitsandbytes")])
def test_missing_optional_optimizer_package(name, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(MissingPackageError, match=f"pip install {package}"):
        check_optimizer_available(name)


def test_optimizers_and_schedules_from_libraries():
    import torch

    p = torch.nn.Parameter(torch.zeros(3))
    for name in ("AdamW", "Adafactor"):
        opt = build_optimizer(name, [{"params": [p], "lr": 1e-3}], lr=1e-3, weight_decay=0.01)
        assert opt.param_groups[0]["lr"] == 1e-3
    opt = build_optimizer("AdamW", [{"params": [p], "lr": 1.0}], lr=1.0, weight_decay=0.0)
    for kind, expected_mid in [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)]:
        sched = build_scheduler(kind, opt, warmup_steps=0, total_steps=10)
        for _ in range(5):
            opt.step()
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(expected_mid)
        opt.param_groups[0]["lr"] = 1.0
        opt.param_groups[0]["initial_lr"] = 1.0
    warm = build_scheduler("constant_with_warmup", opt, warmup_steps=4, total_steps=10)
    assert warm.get_last_lr()[0] == pytest.approx(0.0)


def test_config_hash_ignores_run_control(tmp_path, data):
    a = tiny_config(data, tmp_path / "o")
    b = tiny_config(data, tmp_path / "other", save_every_n_epochs=3, overwrite=True)
    assert a.hash() == b.hash()
    assert a.hash() != tiny_config(data, tmp_path / "o", learning_rate=5e-4).hash()


def test_bucket_limits_follow_the_resolution_unless_set(data, tmp_path):
    """128 px trains without a bucket setting of its own (the tab, API and CLI have no such field)."""
    low = TrainConfig(data=str(data), resolution=128)
    assert low.validate(need_model=False).bucket_limits() == (64, 256)
    assert TrainConfig(resolution=512).bucket_limits() == (256, 1024)  # kohya's defaults at 512
    assert TrainConfig().with_preset("sdxl").bucket_limits() == (512, 2048)
    assert TrainConfig(resolution=64, bucket_reso_steps=32).bucket_limits() == (32, 128)
    assert TrainConfig(resolution=512, min_bucket_reso=320).bucket_limits() == (320, 1024)  # what is set stays
    # a state saved when the limits were written out as 256/1024 still resumes at 512 px
    assert TrainConfig(resolution=512).hash() == TrainConfig(resolution=512, min_bucket_reso=256,
                                                               max_bucket_reso=1024).hash()
    assert TrainConfig(resolution=512).hash() != TrainConfig(resolution=512, min_bucket_reso=320).hash()
    with pytest.raises(ConfigError, match=r"resolution 128 is outside the bucket sizes 256\.\.256; set "
                                          r"min_bucket_reso to 0 to follow the resolution"):
        TrainConfig(data=str(data), resolution=128, min_bucket_reso=256).validate(need_model=False)
    with pytest.raises(ConfigError, match=r"resolution 32 is smaller than one bucket step \(64 px\)"):
        TrainConfig(data=str(data), resolution=32).validate(need_model=False)
    from lora_trainer.train import plan_training

    plan = plan_training(TrainConfig(data=str(data), resolution=128, output_dir=str(tmp_path / "o")))
    assert list(plan.buckets) == ["128x128"]


def test_prodigy_takes_its_learning_rate_as_a_multiplier(tmp_path):
    data = make_dataset(tmp_path / "data")
    with pytest.raises(ConfigError, match="Prodigy sets its own step size .* use 1.0 for both"):
        tiny_config(data, tmp_path / "o", optimizer="Prodigy", learning_rate=1e-4).validate(need_model=False)
    with pytest.raises(ConfigError, match="text encoder 0.0001"):
        tiny_config(data, tmp_path / "o", optimizer="Prodigy", learning_rate=1.0,
                    text_encoder_lr=1e-4).validate(need_model=False)
    tiny_config(data, tmp_path / "o", optimizer="Prodigy", learning_rate=1.0).validate(need_model=False)


def test_prodigy_adapts_its_step_size():
    """prodigyopt is a dependency: the optimizer builds with the fine-tuning settings and raises its
    step-size estimate d from the tiny initial one as it sees gradients."""
    import torch

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    opt = build_optimizer("Prodigy", [{"params": [p], "lr": 1.0}], lr=1.0, weight_decay=0.01)
    group = opt.param_groups[0]
    assert group["use_bias_correction"] and group["safeguard_warmup"]
    d0 = group["d"]
    for _ in range(100):
        opt.zero_grad()
        ((p - 3.0) ** 2).sum().backward()
        opt.step()
    assert group["d"] > 1e4 * d0 and abs(float(p.detach().mean()) - 3.0) < 1.0  # from 1e-6 to ~0.4: it got there
