"""fp8 on a real GPU: the fp8 products (accel's fp8_matmul), the fp8 base's compiled dequantisation and the lean
LoRA product over a QuantLinear, each checked against its eager form and inside a CUDA graph.

Skipped without CUDA (CI has none); run on the GPU machine with `python -m pytest tests/test_fp8_cuda.py`
(bench/gpu_followups.sh, STAGE=quick). Single layers at Flux's widths: seconds.
"""

from __future__ import annotations

import pytest
import torch

from lora_trainer import accel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _off_the_legacy_stream():
    """Each test's CUDA work on a stream of its own, as the engine's steps run (accel/graphs.py). A leaf's gradient
    accumulator keeps the stream of the leaf's first use: first used on the default (legacy) stream, e.g. for a
    test's eager reference, its accumulation inside a later capture runs there and CUDA refuses the capture
    ("operation would make the legacy stream depend on a capturing blocking stream"; seen on an H200, torch 2.11)."""
    if not torch.cuda.is_available():
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def _captured(step, warm=None):
    """`step()` run once eagerly on a side stream (`warm()` after it, e.g. to clear gradients), then captured in a
    CUDA graph and replayed once; returns what the capture returned (the replay's results)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        step()
        if warm is not None:
            warm()
        with torch.cuda.graph(graph):
            static = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    return static


@cuda
def test_fp8_products_on_gpu_close_and_captured():
    """fp8_matmul on the GPU (compute capability >= 8.9): close to the dequantised bf16 product, the backward
    unchanged, and the product replays inside a CUDA graph."""
    from lora_trainer.accel.fp8 import use_fp8_products
    from lora_trainer.quant.fp8_products import fp8_matmul_supported

    if not fp8_matmul_supported("cuda"):
        pytest.skip("GPU without fp8 tensor cores")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 1024, bias=True).cuda().to(torch.bfloat16).requires_grad_(False)
    q = accel.Fp8Linear(lin)
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    ref = q(x).float()
    assert use_fp8_products(q) == 1
    out = q(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 0.05
    assert torch.equal(_captured(lambda: q(x)), out)
    from lora_trainer.quant import Fp8Weight, QuantLinear  # Flux's fp8 base

    ql = QuantLinear(Fp8Weight.quantize(lin.weight, per_row=True), lin.bias.detach(), dtype=torch.bfloat16)
    ref_q = ql(x).float()
    assert use_fp8_products(ql, backward=True) == 1
    xg = x.clone().requires_grad_(True)
    out_q = ql(xg)
    assert float((out_q.float() - ref_q).norm() / ref_q.norm()) < 0.05
    out_q.float().square().sum().backward()
    assert torch.isfinite(xg.grad).all()
    # a plain-cast fp8 checkpoint's weight (no scale, as flux1-dev-fp8 files): forward and backward captured
    plain = QuantLinear(Fp8Weight.quantize(lin.weight, scaled=False), None, dtype=torch.bfloat16)
    assert use_fp8_products(plain, backward=True) == 1
    xs = x.clone().requires_grad_(True)

    def step():
        y = plain(xs)
        y.float().square().sum().backward()
        return y

    static = _captured(step, warm=lambda: setattr(xs, "grad", None))
    assert torch.isfinite(static).all() and torch.isfinite(xs.grad).all()


@cuda
def test_fused_dequant_on_gpu_gives_the_eager_values_and_is_captured():
    """fp8 weights dequantised by the compiled kernel (accel's fused_math, `use_fused_dequant`): bit-equal to
    torch's cast and scale at every scale kind and dtype, compiled (no eager fallback), and inside a CUDA graph."""
    from lora_trainer.accel import fused_math
    from lora_trainer.quant import Fp8Weight, QuantLinear

    before = len(fused_math._failed)
    torch.manual_seed(0)
    for shape in ((3072, 3072), (9216, 3072), (3072, 12288), (64, 48)):
        w = torch.randn(shape, device="cuda")
        for fw in (Fp8Weight.quantize(w, scaled=False), Fp8Weight.quantize(w), Fp8Weight.quantize(w, per_row=True)):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                assert torch.equal(fw.dequantize(dtype, fused=True), fw.dequantize(dtype)), (shape, fw.format, dtype)
    assert fused_math._failed[before:] == []
    lin = torch.nn.Linear(3072, 1024).cuda().requires_grad_(False)
    ql = QuantLinear(Fp8Weight.quantize(lin.weight, scaled=False), lin.bias.detach(), dtype=torch.bfloat16)
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = ql(x)
    (g_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
    assert fused_math.use_fused_dequant(ql, "cuda") == 1

    def step():
        y = ql(x)
        y.float().square().sum().backward()
        return y

    static = _captured(step, warm=lambda: setattr(x, "grad", None))
    assert torch.equal(static, ref) and torch.equal(x.grad, g_ref)


@cuda
@pytest.mark.parametrize("compute8", [0, 1, 2])
def test_lean_lora_product_over_fp8_base_on_gpu_matches_peft_and_is_captured(compute8):
    """accel's lean LoRA forward over a QuantLinear (one autograd function for base and LoRA products) on the GPU,
    with bf16 products, fp8 forward products and fp8 input gradients: close to peft's own forward (the fp8 cases to
    the fp8 tolerance), and replayed inside a CUDA graph."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_trainer.accel.fp8 import use_fp8_products
    from lora_trainer.accel.lora_fast import fuse_lora_layers, unfuse_lora_layers
    from lora_trainer.quant import Fp8Weight, QuantLinear
    from lora_trainer.quant.fp8_products import fp8_matmul_supported

    if compute8 and not fp8_matmul_supported("cuda"):
        pytest.skip("GPU without fp8 tensor cores")
    torch.manual_seed(0)
    w = torch.randn(1024, 3072, device="cuda") * 0.02
    model = torch.nn.Sequential(QuantLinear(Fp8Weight.quantize(w, scaled=False), torch.zeros(1024, device="cuda"),
                                            dtype=torch.bfloat16))
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["0"]), model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    if compute8:
        assert use_fp8_products(model, backward=compute8 == 2) == 1
    x = torch.randn(1, 4608, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        grads = torch.autograd.grad(y.float().square().mean(), [x, *params])
        return [y, *grads]

    want = step()
    assert fuse_lora_layers(model) == 1
    got = step()
    tol = 5e-2 if compute8 else 1e-2
    for g, r in zip(got, want):
        assert float((g.float() - r.float()).norm() / r.float().norm()) < tol
    static = _captured(step)
    for g, s in zip(got, static):
        assert torch.equal(g, s)
    unfuse_lora_layers(model)
