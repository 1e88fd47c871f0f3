"""peft injection, kohya import/export round trips, and clean removal, on tiny real models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.lora import LoraFileError, LoraSpec, find_targets, inject_lora, load_kohya_file
from lora_trainer.models.tiny import build_tiny_bundle

_CACHE: dict = {}


def _bundle(family: str):
    if family not in _CACHE:
        _CACHE[family] = build_tiny_bundle(family, seed=2)
    return copy.deepcopy(_CACHE[family])


def _randomize(net, seed=7):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _unet_out(bundle):
    g = torch.Generator().manual_seed(0)
    kwargs = {}
    if bundle.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return bundle.unet(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10]),
                           torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=g), **kwargs).sample


def test_init_matches_kohya_and_is_seeded():
    bundle = _bundle("sd1")
    base = _unet_out(bundle)
    rng = torch.get_rng_state()
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=1), seed=123)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded init leaves the global RNG alone
    sd = net.kohya_state_dict(dtype=torch.float32)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    downs = [v for k, v in sd.items() if k.endswith("lora_down.weight")]
    assert all(torch.count_nonzero(u) == 0 for u in ups)  # lora_up = zeros
    for d in downs:  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
        fan_in = d[0].numel()
        assert d.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7 and d.abs().max() > 0
    assert torch.equal(_unet_out(bundle), base)  # a fresh LoRA changes nothing
    net.remove()
    again = inject_lora(bundle, LoraSpec(rank=4, alpha=1), seed=123).kohya_state_dict(dtype=torch.float32)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_adapters_are_kohyas_draws_from_the_seed_where_peft_would_place_them(family):
    """peft builds the adapters on the meta device; each lands on its base weight's device in the
    requested dtype (None: the base's, as peft does), holding our generator's draws in kohya's order."""
    bundle = _bundle(family)
    bundle.unet.half()
    spec = LoraSpec(rank=4, alpha=2, conv_rank=3)
    net = inject_lora(bundle, spec, seed=5)
    gen = torch.Generator().manual_seed(5)
    for t in net.targets:
        layer = net.layers[t.kohya_name]
        down, up = layer.lora_A["kohya"].weight, layer.lora_B["kohya"].weight
        bound = 1.0 / math.sqrt(down[0].numel())
        assert torch.equal(down, torch.empty(down.shape).uniform_(-bound, bound, generator=gen))
        assert torch.count_nonzero(up) == 0 and down.dtype == up.dtype == torch.float32
        assert down.requires_grad and up.requires_grad and not layer.base_layer.weight.requires_grad
    net.remove()
    kept = inject_lora(bundle, spec, seed=5, dtype=None)
    assert {(p.dtype, p.device.type) for p in kept.parameters("unet")} == {(torch.float16, "cpu")}
    assert {p.dtype for p in kept.parameters("te")} == {torch.float32}
    kept.remove()
    bundle.unet.to("meta")
    on_meta = inject_lora(bundle, spec, seed=5)
    assert all(p.is_meta for p in on_meta.parameters("unet"))
    assert not any(p.is_meta for p in on_meta.parameters("te"))


def test_scale_is_alpha_over_rank_and_adapters_train_in_fp32():
    bundle = _bundle("sd1")
    bundle.unet.half()
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=3.0, train_text_encoder=False), seed=0)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for n, p in bundle.unet.named_parameters() if "lora_" not in n)
    _randomize(net)
    bundle.unet.float()
    t = next(t for t in net.targets if t.module_name.endswith("attn1.to_q"))
    layer = net.layers[t.kohya_name]
    x = torch.randn(2, 5, layer.base_layer.in_features)
    sd = net.kohya_state_dict(dtype=torch.float32)
    down, up = sd[f"{t.kohya_name}.lora_down.weight"], sd[f"{t.kohya_name}.lora_up.weight"]
    expected = layer.base_layer(x) + (x @ down.T @ up.T) * (3.0 / 4)
    torch.testing.assert_close(layer(x), expected)
    assert sd[f"{t.kohya_name}.alpha"].dim() == 0 and float(sd[f"{t.kohya_name}.alpha"]) == 3.0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_importer_reads_back_bit_exactly_with_alpha_not_rank(tmp_path, family):
    spec = LoraSpec(rank=4, alpha=1.5, conv_rank=2, conv_alpha=0.5)
    bundle = _bundle(family)
    net = inject_lora(bundle, spec, seed=1)
    _randomize(net)
    out = _unet_out(bundle)
    fresh, net2 = _bundle(family), None
    for dtype in (torch.float16, torch.float32):  # fp32 last: its outputs must then match exactly
        path = net.save_kohya(tmp_path / f"a-{dtype}.safetensors", {}, dtype=dtype)
        written, _ = load_kohya_file(path)

        read_spec = LoraSpec.from_kohya_state_dict(written)
        assert (read_spec.rank, read_spec.alpha, read_spec.conv_rank, read_spec.conv_alpha) == (4, 1.5, 2, 0.5)
        assert read_spec.train_unet and read_spec.train_text_encoder and read_spec.module_ranks is None
        net2 = net2 or inject_lora(fresh, read_spec, seed=99)
        report = net2.load_kohya_state_dict(written, strict=True)
        assert report.complete and len(report.loaded) == len(net.targets)
        again = net2.kohya_state_dict(dtype=dtype)
        assert again.keys() == written.keys()
        for k in written:
            assert again[k].dtype == written[k].dtype and torch.equal(again[k], written[k]), k
        if dtype == torch.float32:
            assert torch.equal(_unet_out(fresh), out)
            assert net2.load_file(path, strict=True).complete


def test_per_block_ranks_round_trip(tmp_path):
    """kohya's block_dims give modules different ranks; such files load and re-export exactly."""
    bundle = _bundle("sdxl")
    names = [t.kohya_name for t in find_targets(bundle)]
    odd = {names[0]: 2, names[-1]: 6, next(n for n in names if "input_blocks" in n): 1}
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=2, conv_rank=3, module_ranks=odd), seed=0)
    _randomize(net)
    sd = net.kohya_state_dict(dtype=torch.float32)
    assert {n: sd[f"{n}.lora_down.weight"].shape[0] for n in odd} == odd
    spec = LoraSpec.from_kohya_state_dict(sd)
    assert (spec.rank, spec.alpha, spec.conv_rank, spec.module_ranks) == (4, 2.0, 3, odd)
    other = inject_lora(_bundle("sdxl"), spec, seed=3)
    assert other.load_kohya_state_dict(sd, strict=True).complete
    again = other.kohya_state_dict(dtype=torch.float32)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_importer_reports_unmatched_modules_and_strict_raises():
    full = inject_lora(_bundle("sd1"), LoraSpec(rank=4, alpha=4, conv_rank=2), seed=0)
    _randomize(full)
    sd = full.kohya_state_dict()
    sd["lora_unet_foo_bar.hada_w1_a"] = torch.zeros(2)  # a LyCORIS key we do not train

    unet_only = inject_lora(_bundle("sd1"), LoraSpec(rank=4, alpha=4, train_text_encoder=False), seed=0)
    report = unet_only.load_kohya_state_dict(sd)
    te = {t.kohya_name for t in full.targets if t.component == "te"}
    conv = {t.kohya_name for t in full.targets if t.component == "unet"} - {t.kohya_name for t in unet_only.targets}
    assert set(report.unexpected) == te | conv
    assert report.unexpected_keys == ["lora_unet_foo_bar.hada_w1_a"]
    assert report.missing == [] and len(report.loaded) == len(unet_only.targets)
    assert "in the file but not in the model" in report.summary()
    with pytest.raises(LoraFileError, match="does not match this model"):
        unet_only.load_kohya_state_dict(sd, strict=True)

    te_only = inject_lora(_bundle("sd1"), LoraSpec(rank=4, alpha=4, train_unet=False), seed=0)
    partial = {k: v for k, v in sd.items() if k.startswith("lora_te_text_model_encoder_layers_0_")}
    report = te_only.load_kohya_state_dict(partial)
    assert len(report.loaded) == 6 and len(report.missing) == len(te_only.targets) - 6


def test_importer_rejects_wrong_rank_and_wrong_family_clearly():
    sd = inject_lora(_bundle("sd1"), LoraSpec(rank=8, alpha=8), seed=0).kohya_state_dict()
    net = inject_lora(_bundle("sd1"), LoraSpec(rank=4, alpha=4), seed=0)
    with pytest.raises(LoraFileError, match="from_kohya_state_dict"):
        net.load_kohya_state_dict(sd)
    xl = inject_lora(_bundle("sdxl"), LoraSpec(rank=8, alpha=8, train_text_encoder=False), seed=0)
    # a full-size SD1 file (768-wide cross-attention) is recognised as SD1 before any copying
    sd1_file = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                torch.zeros(8, 768), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
                ".lora_up.weight": torch.zeros(320, 8)}
    with pytest.raises(LoraFileError, match="The LoRA is for SD1 but the model is SDXL"):
        xl.load_kohya_state_dict(sd1_file)
    report = xl.load_kohya_state_dict({k: v for k, v in sd.items() if k.startswith("lora_te_")})
    assert report.loaded == [] and len(report.unexpected) == len({k.split(".")[0] for k in sd if "lora_te_" in k})


def test_sdxl_importer_accepts_diffusers_style_unet_names():
    """Some tools write SDXL UNet names in diffusers layout; kohya converts them on load, so do we."""
    net = inject_lora(_bundle("sdxl"), LoraSpec(rank=4, alpha=2, train_text_encoder=False), seed=0)
    _randomize(net)
    ours = net.kohya_state_dict(dtype=torch.float32)
    renamed = {}
    for t in net.targets:
        alt = "lora_unet_" + t.module_name.replace(".", "_")
        assert alt != t.kohya_name
        for suffix in ("alpha", "lora_down.weight", "lora_up.weight"):
            renamed[f"{alt}.{suffix}"] = ours[f"{t.kohya_name}.{suffix}"]
    other = inject_lora(_bundle("sdxl"), LoraSpec(rank=4, alpha=2, train_text_encoder=False), seed=5)
    assert other.load_kohya_state_dict(renamed, strict=True).complete
    again = other.kohya_state_dict(dtype=torch.float32)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_parameters_by_component():
    net = inject_lora(_bundle("sdxl"), LoraSpec(rank=2, alpha=1), seed=0)
    n = {c: len(list(net.parameters(c))) for c in ("unet", "te", "te1", "te2", None)}
    assert n["te"] == n["te1"] + n["te2"] and n[None] == n["unet"] + n["te"]
    assert n["te1"] == n["te2"] == 2 * 6 * 3  # tiny encoders: 3 layers x 6 modules x (down, up)
    ids = {id(p) for p in net.parameters()}
    assert len(ids) == n[None]


def test_multiplier_zero_gives_base_output():
    bundle = _bundle("sd1")
    base = _unet_out(bundle)
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=4), seed=0)
    _randomize(net)
    lora_out = _unet_out(bundle)
    net.set_multiplier(0.0)
    torch.testing.assert_close(_unet_out(bundle), base, atol=1e-6, rtol=0)
    net.set_multiplier(1.0)
    assert torch.equal(_unet_out(bundle), lora_out)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_remove_restores_base_modules_exactly(family):
    bundle = _bundle(family)
    bundle.text_encoders[0].requires_grad_(True)  # a mixed requires_grad state must come back too
    roots = {"unet": bundle.unet, **{f"te{i}": te for i, te in enumerate(bundle.text_encoders)}}
    before = {}
    for name, root in roots.items():
        for key, p in root.named_parameters():
            before[(name, key)] = (p, p.detach().clone(), p.data_ptr(), p.requires_grad)
    modules = {(name, n): m for name, root in roots.items() for n, m in root.named_modules()}
    attrs = {name: set(vars(root)) for name, root in roots.items()}
    base_out = _unet_out(bundle)

    net = inject_lora(bundle, LoraSpec(rank=4, alpha=2, conv_rank=2), seed=0)
    _randomize(net)
    _unet_out(bundle)
    net.remove()
    net.remove()  # idempotent
    assert torch.equal(_unet_out(bundle), base_out)

    after_modules = {(name, n): m for name, root in roots.items() for n, m in root.named_modules()}
    assert after_modules.keys() == modules.keys()
    assert all(after_modules[k] is modules[k] for k in modules)
    for name, root in roots.items():
        assert set(vars(root)) == attrs[name]
        params = dict(root.named_parameters())
        assert {k for (n, k) in before if n == name} == set(params)
        for key, p in params.items():
            obj, value, ptr, grad = before[(name, key)]
            assert p is obj and p.data_ptr() == ptr and p.requires_grad == grad
            assert torch.equal(p.detach(), value)


def test_spec_validation_errors_are_user_errors():
    with pytest.raises(ConfigError, match="rank"):
        LoraSpec(rank=0, alpha=1).validate()
    with pytest.raises(ConfigError, match="enable at least one"):
        inject_lora(_bundle("sd1"), LoraSpec(rank=4, alpha=1, train_unet=False, train_text_encoder=False))
    with pytest.raises(LoraFileError, match="no kohya LoRA weights"):
        LoraSpec.from_kohya_state_dict({"foo": torch.zeros(1)})
    bundle = _bundle("sd1")
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=1), seed=0)
    with pytest.raises(ConfigError, match="already carries LoRA adapters"):
        inject_lora(bundle, LoraSpec(rank=4, alpha=1))
    net.remove()
    inject_lora(bundle, LoraSpec(rank=4, alpha=1)).remove()
    assert LoraSpec(rank=8, alpha=None).effective_alpha == 8.0  # kohya: no alpha = rank
    assert LoraSpec(rank=8, alpha=4, conv_rank=4).effective_conv_alpha == 1.0  # kohya's conv_alpha default
