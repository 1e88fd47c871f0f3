"""accel/geglu.py: the GEGLU kernels compute diffusers' h·gelu(g) and its gradient, and take the GEGLU modules of a
real diffusers UNet with LoRA.

The kernels are Triton's: on a GPU compiled, without one in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there). Where Triton is not installed, or older than 3, the tests skip (as
tests/test_group_norm_nhwc.py's).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _why_not() -> str:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    version = importlib.metadata.version("triton")
    if int(version.split(".")[0]) < 3:
        return f"Triton {version}: the GEGLU kernels need 3.0 or later"
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU and Triton's interpreter not chosen (tests/conftest.py does)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")


def _run(hg, dy, approximate):
    from lora_trainer.accel.geglu import geglu

    hg = hg.detach().requires_grad_()
    y = geglu(hg, approximate)
    (y.float() * dy).sum().backward()
    return y, hg.grad


def _exact(hg, dy, approximate):
    """torch's math in fp64 (autograd through chunk, GELU and the product)."""
    hg = hg.detach().double().requires_grad_()
    h, g = hg.chunk(2, dim=-1)
    y = h * F.gelu(g, approximate=approximate)
    (y * dy.double()).sum().backward()
    return y, hg.grad


@pytest.mark.parametrize("shape", [
    (3, 5, 2 * 200),  # a half width past one 128-column block, rows not a multiple of 8
    (2, 3, 4, 2 * 40),  # several leading dims, a half narrower than a block
    (16, 2 * 128),  # whole blocks
])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_torch_in_fp32(shape, approximate):
    g = torch.Generator().manual_seed(0)
    hg = (torch.randn(shape, generator=g) * 2).to(DEVICE)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(DEVICE)
    y, dhg = _run(hg, dy, approximate)
    assert "GEGLU" in y.grad_fn.name()  # the kernels, not the eager fallback
    ref_y, ref_dhg = _exact(hg, dy, approximate)
    assert y.shape == ref_y.shape and y.dtype == torch.float32
    assert dhg.shape == hg.shape and dhg.is_contiguous()
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dhg.double(), ref_dhg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_as_close_to_exact_as_torchs(dtype, approximate):
    """fp32 math and one rounding: each value within a unit in the last place of the exact result (Triton's
    interpreter rounds fp32 to bf16 toward zero, a GPU to nearest), and on a GPU on average closer to it than torch's
    own low-precision GELU and products (which round after the GELU and after each product). Where gelu(g) is
    tiny (g far below zero) fp32's 1 + erf cancels, as in torch's: an absolute error of fp32's scale."""
    g = torch.Generator().manual_seed(1)
    hg = (torch.randn(4, 6, 2 * 136, generator=g) * 2).to(dtype).to(DEVICE)
    dy = torch.randn(4, 6, 136, generator=g).to(dtype).to(DEVICE)
    y, dhg = _run(hg, dy, approximate)
    assert y.dtype == dhg.dtype == dtype and dhg.is_contiguous() and dhg.shape == hg.shape
    theirs_hg = hg.detach().requires_grad_()
    h, gate = theirs_hg.chunk(2, dim=-1)
    theirs = h * F.gelu(gate, approximate=approximate)
    (theirs.float() * dy).sum().backward()
    ref_y, ref_dhg = _exact(hg, dy, approximate)
    bits = 8 if dtype == torch.bfloat16 else 11  # significand bits
    for ours, torchs, exact in ((y, theirs, ref_y), (dhg, theirs_hg.grad, ref_dhg)):
        exact = exact.detach()
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - bits)
        err = (ours.double() - exact).abs()
        assert (err <= 1.001 * ulp + 1e-6 * exact.abs().max()).all(), float((err / ulp).max())
        if DEVICE == "cuda":
            assert err.mean() <= (torchs.detach().double() - exact).abs().mean()


def test_other_inputs_take_torchs_math():
    from lora_trainer.accel.geglu import geglu

    hg = torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = geglu(hg)  # fp64: not a kernel dtype
    assert "GEGLU" not in y.grad_fn.name()
    torch.testing.assert_close(y, hg[..., :4] * F.gelu(hg[..., 4:]))
    hs = torch.randn(2, 64, device=DEVICE)[:, ::2].requires_grad_()  # a strided input: made contiguous first
    torch.testing.assert_close(geglu(hs), hs[:, :16] * F.gelu(hs[:, 16:]))


def test_kernels_that_do_not_run_leave_torchs_math_with_a_warning(monkeypatch, caplog):
    """No Triton, an old one or a GPU it cannot compile for: checked once, said once, and the eager math runs."""
    from lora_trainer.accel import geglu as gg

    def broken(interpret):
        raise RuntimeError("no kernels here")

    monkeypatch.setattr(gg, "_kernels", broken)
    monkeypatch.setattr(gg, "_checked", {})
    hg = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    with caplog.at_level("WARNING"):
        y = gg.geglu(hg)
        gg.geglu(hg)
    assert [r.getMessage() for r in caplog.records if "do not run" in r.getMessage()] == [
        f"The GEGLU Triton kernels do not run on {hg.device} (RuntimeError: no kernels here): torch's runs"]
    assert "GEGLU" not in y.grad_fn.name()
    torch.testing.assert_close(y, hg[..., :8] * F.gelu(hg[..., 8:]))


def test_a_check_that_disagrees_leaves_torchs_math(monkeypatch, caplog):
    from lora_trainer.accel import geglu as gg

    monkeypatch.setattr(gg, "_checked", {})
    monkeypatch.setattr(gg, "_forward", lambda hg, approximate: torch.zeros(*hg.shape[:-1], hg.shape[-1] // 2,
                                                                          device=hg.device, dtype=hg.dtype))
    with caplog.at_level("WARNING"):
        assert not gg.check_kernels(DEVICE, torch.float32)
    assert any("disagree" in r.getMessage() for r in caplog.records)


def _geglus(unet):
    from diffusers.models.activations import GEGLU

    return [m for m in unet.modules() if type(m) is GEGLU]


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU: tests/test_accel_cuda.py runs the kernels at SD's shapes")
def test_a_unet_with_lora_gives_diffusers_output_and_gradients(monkeypatch):
    """A real tiny diffusers UNet with peft LoRA (on the GEGLU projections too): the fused GEGLU forward gives
    diffusers' output and LoRA gradients, the kernels run, and restoring gives diffusers' forward back."""
    from accel_support import assert_grads_match, fwd_bwd, inputs, lora_unet

    from lora_trainer import accel
    from lora_trainer.accel import geglu as gg

    unet = lora_unet()
    batch = inputs(unet, bs=2)
    ref_out, ref_grads = fwd_bwd(unet, batch)
    geglus = _geglus(unet)
    assert geglus and all("lora_A" in dir(m.proj) for m in geglus)  # the projections are peft LoRA Linears
    assert accel.use_fused_geglu(unet) == len(geglus)
    calls = []
    real = gg._GEGLU.apply
    monkeypatch.setattr(gg._GEGLU, "apply", lambda *a: calls.append(1) or real(*a))
    out, grads = fwd_bwd(unet, batch)
    assert len(calls) == len(geglus)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert_grads_match(grads, ref_grads, rtol=5e-4)  # erf and products in another order: fp32 rounding, amplified
    # diffusers' deprecated `scale` argument: its own forward (and its warning)
    x = torch.randn(2, 5, geglus[0].proj.in_features)
    with pytest.warns(FutureWarning):
        torch.testing.assert_close(geglus[0](x, scale=1.0), type(geglus[0]).forward(geglus[0], x))
    assert accel.restore_geglu(unet) == len(geglus) and accel.restore_geglu(unet) == 0
    assert all("forward" not in m.__dict__ for m in geglus)
    calls.clear()
    fwd_bwd(unet, batch)
    assert not calls


def test_prepare_model_counts_the_fused_geglus_where_they_apply():
    from accel_support import lora_unet

    from lora_trainer import accel

    unet = lora_unet()
    n = len(_geglus(unet))
    assert accel.AccelOptions().fused_geglu  # on by default (CUDA only: prepare_model counts none elsewhere)
    assert accel.prepare_model(unet, accel.AccelOptions(fused_geglu=True), device="cpu")["fused_geglus"] == 0  # CUDA
    assert accel.prepare_model(unet, accel.AccelOptions(fused_geglu=False))["fused_geglus"] == 0
    if DEVICE == "cpu":  # the interpreter is on: a model prepared without a device takes them
        assert accel.prepare_model(unet, accel.AccelOptions(fused_geglu=True))["fused_geglus"] == n > 0
    accel.restore_geglu(unet)
    assert not accel.AccelOptions.off().fused_geglu
    assert not accel.AccelOptions.from_config(type("C", (), {"accel": "off"})()).fused_geglu
