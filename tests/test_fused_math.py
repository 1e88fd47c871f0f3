"""Compiled tensor functions (accel/fused_math.py): Flux's weightless block math, which the blocks route through
`BlockMath`, and the fp8 products' row rounding. The compiled versions are the same functions: on the CPU
torch.compile traces them with the `aot_eager` backend (the graphs inductor would compile, run op by op: no Triton
here); inductor on CUDA is tests/test_accel_cuda.py's."""

from __future__ import annotations

import pytest
import torch
from flux_support import inputs

from lora_trainer.accel import fused_math
from lora_trainer.accel.options import AccelOptions
from lora_trainer.models.flux import FluxTransformer
from lora_trainer.models.flux.block_math import EAGER_MATH
from lora_trainer.models.flux.model import FluxParams
from lora_trainer.torch_version import torch_at_least

SMALL = FluxParams(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12),
                   context_in_dim=32, vec_in_dim=16)


@pytest.fixture(autouse=True)
def _cuda_initialised() -> None:
    # on a machine with CUDA, the first compiled call inside a checkpointed block would initialise CUDA there,
    # which checkpointing refuses ("device state was initialized in the forward pass"); training initialises
    # CUDA long before its first step, so the tests do too
    if torch.cuda.is_available():
        torch.cuda.init()


def _model(seed: int = 0) -> FluxTransformer:
    torch.manual_seed(seed)
    model = FluxTransformer(SMALL)
    with torch.no_grad():  # norms' scales away from 1, so a mixed-up scale would show
        for name, p in model.named_parameters():
            if name.endswith(("query_norm.scale", "key_norm.scale")):
                p.uniform_(0.5, 1.5)
    return model


def _loss_and_grads(model: FluxTransformer, x: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    img = x["img"].clone().requires_grad_()
    out = model(**{**x, "img": img})
    out.square().mean().backward()
    return out.detach(), img.grad, [p.grad.clone() for p in model.parameters()]


def test_blocks_use_the_eager_math_until_told_and_inductor_needs_cuda():
    model = _model()
    blocks = [*model.double_blocks, *model.single_blocks]
    assert all(b.math is EAGER_MATH for b in blocks)
    assert not any(".math" in k for k in model.state_dict())  # no parameters or keys of its own
    assert fused_math.use_fused_math(model, "cpu") == 0  # CPU: inductor's Triton path does not apply
    assert all(b.math is EAGER_MATH for b in blocks)
    assert AccelOptions().fused_math and not AccelOptions.off().fused_math


@pytest.mark.skipif(not torch_at_least(2, 3), reason="Flux runs on torch >= 2.3 stacks (Forge main's 2.3.1 up)")
def test_traced_block_math_is_the_same_function_forward_and_backward():
    x = inputs(SMALL, seed=2, tokens=5, latent=8, batch=2)
    eager, fused = _model(), _model()
    for m in (eager, fused):  # as training runs them: the backward recomputes each block (and may stop early)
        m.enable_gradient_checkpointing()
    assert fused_math.use_fused_math(fused, backend="aot_eager") == SMALL.depth + SMALL.depth_single_blocks
    before = len(fused_math._failed)
    out_e, dimg_e, grads_e = _loss_and_grads(eager, x)
    out_f, dimg_f, grads_f = _loss_and_grads(fused, x)
    assert fused_math._failed[before:] == []  # traced as one graph each (fullgraph), no eager fallback
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dimg_f, dimg_e, rtol=1e-5, atol=1e-6)
    for g_f, g_e in zip(grads_f, grads_e):
        torch.testing.assert_close(g_f, g_e, rtol=1e-5, atol=1e-6)
    # a second shape (another bucket) and no-grad inference (the scoring, samples) run through it too
    with torch.no_grad():
        x2 = inputs(SMALL, seed=3, tokens=7, latent=12, batch=1)
        torch.testing.assert_close(fused(**x2), eager(**x2), rtol=1e-5, atol=1e-6)
    assert fused_math._failed[before:] == []


@pytest.mark.skipif(not torch_at_least(2, 3), reason="Flux runs on torch >= 2.3 stacks (Forge main's 2.3.1 up)")
def test_a_call_that_cannot_be_compiled_runs_eagerly_in_its_forward_and_its_recomputation():
    def no_cat(gm, example_inputs):  # a compiler that fails on the graphs with a cat (double_qkv, single_out)
        if any(node.target is torch.cat for node in gm.graph.nodes):
            raise RuntimeError("this compiler cannot do cat")
        return gm.forward

    x = inputs(SMALL, seed=4, tokens=5, latent=8, batch=1)
    eager, fused = _model(), _model()
    for m in (eager, fused):
        m.enable_gradient_checkpointing()
    before = len(fused_math._failed)
    assert fused_math.use_fused_math(fused, backend=no_cat) == SMALL.depth + SMALL.depth_single_blocks
    out_e, dimg_e, grads_e = _loss_and_grads(eager, x)
    out_f, dimg_f, grads_f = _loss_and_grads(fused, x)  # no CheckpointError: forward and recompute agree
    failed = fused_math._failed[before:]
    assert {f.split(":")[0] for f in failed} == {"double_qkv", "single_out"}, failed
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dimg_f, dimg_e, rtol=1e-5, atol=1e-6)
    for g_f, g_e in zip(grads_f, grads_e):
        torch.testing.assert_close(g_f, g_e, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch_at_least(2, 3) or not hasattr(torch, "float8_e4m3fn"),
                    reason="fp8 products run on torch >= 2.5 stacks")
def test_fp8_row_rounding_traces_whole_and_rounds_the_same():
    # fp8 products (accel's fp8_matmul) round their inputs through these, compiled on CUDA with Triton
    from lora_trainer.quant.fp8_products import quantize_rows, scaled_rows

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 48, generator=g) * torch.logspace(-3, 2, 32).reshape(-1, 1)).bfloat16()
    scale = torch.rand(48, generator=g) + 0.5
    before = len(fused_math._failed)
    for fn, args in ((quantize_rows, (x,)), (scaled_rows, (x, scale))):
        want8, want_s = fn(*args)
        got8, got_s = fused_math.fused(fn, "aot_eager")(*args)
        assert got8.dtype == torch.float8_e4m3fn and torch.equal(got8.view(torch.uint8), want8.view(torch.uint8))
        assert torch.equal(got_s, want_s)
    assert fused_math._failed[before:] == []


@pytest.mark.skipif(not torch_at_least(2, 3), reason="Flux runs on torch >= 2.3 stacks (Forge main's 2.3.1 up)")
def test_more_kinds_of_call_than_dynamos_recompile_limit_are_all_compiled():
    # the block math is called from many places (streams, modulation chunks' strides, grad modes): dynamo's own
    # limit of 8 compiled variants per function would otherwise stop a training run (fullgraph raises)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def scaled_sum(x: torch.Tensor) -> torch.Tensor:  # a function of its own: no variants from other tests
        return (x * 2).sum(-1)

    before = len(fused_math._failed)
    call = fused_math.fused(scaled_sum, "aot_eager")
    for rank in range(1, 13):  # a new rank cannot be covered by a dynamic-shape variant: 12 variants
        x = torch.ones((2,) * rank)
        torch.testing.assert_close(call(x), scaled_sum(x))
    assert fused_math._failed[before:] == []
    assert len(_debug_get_cache_entry_list(scaled_sum.__code__)) == 12
