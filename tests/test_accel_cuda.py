"""accel/ on a real GPU: CUDA graphs, fused AdamW, bf16/fp16, fp8, norms, OOM message, SDPA.

Skipped without CUDA (CI has none); run on the GPU machine with
`python -m pytest tests/test_accel_cuda.py` (bench/README.md). Tiny models: seconds.
"""

from __future__ import annotations

import pytest
import torch
from train_support import make_dataset, tiny_config

from lora_trainer import accel
from lora_trainer.models.bundle import Family

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _unet(seed=0):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from lora_trainer.models import tiny

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny.unet_config(Family.SD1))
    tiny._randomize(unet, torch.Generator().manual_seed(seed))
    unet = unet.to("cuda", torch.bfloat16).requires_grad_(False).train()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def _train(unet, opts, steps=12, scaler=None, dtype=torch.bfloat16, inf_at=None, between=None):
    params = [p for p in unet.parameters() if p.requires_grad]
    accel.prepare_model(unet, opts, device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-3, **accel.optimizer_kwargs("cuda"))

    def loss_fn(b):
        with torch.autocast("cuda", dtype=dtype):
            out = unet(b["x"], b["t"], b["ctx"], return_dict=False)[0]
        return torch.nn.functional.mse_loss(out.float(), b["noise"]) * b["scale"]

    runner = accel.StepRunner(loss_fn, params, opt, opts, max_grad_norm=1.0, scaler=scaler, device="cuda")  # as the engine
    g = torch.Generator(device="cuda").manual_seed(5)
    losses = []
    for i in range(steps):
        b = {"x": torch.randn(2, 4, 16, 16, device="cuda", generator=g),
             "t": torch.randint(0, 1000, (2,), device="cuda", generator=g),
             "ctx": torch.randn(2, 7, 32, device="cuda", generator=g),
             "noise": torch.randn(2, 4, 16, 16, device="cuda", generator=g),
             "scale": torch.full((), float("inf") if i == inf_at else 1.0, device="cuda")}
        losses.append(runner.step(b).item())
        if between is not None:
            between(i, runner, unet)
        if i == 7:  # a lower learning rate mid-run must reach the captured optimizer
            for group in opt.param_groups:
                group["lr"] = 1e-4
    return losses, runner, {n: p.detach().float().cpu() for n, p in unet.named_parameters() if p.requires_grad}


@cuda
def test_graphs_and_fused_lora_match_eager_peft_on_gpu():
    l_ref, r_ref, w_ref = _train(_unet(), accel.AccelOptions.off())
    l_fast, r_fast, w_fast = _train(_unet(), accel.AccelOptions())
    assert not r_ref.uses_graphs and r_fast.uses_graphs, r_fast.disabled_reason
    assert r_fast.stats["graphs"] == 1 and r_fast.stats["graph_replays"] == 12 - accel.AccelOptions().graph_warmup
    assert l_fast == pytest.approx(l_ref, rel=2e-2)  # bf16 autocast tolerance
    cat = lambda w: torch.cat([v.flatten() for _, v in sorted(w.items())])
    assert float((cat(w_fast) - cat(w_ref)).norm() / cat(w_ref).norm()) < 3e-2
    # the same model and levers without graphs: the replay computes what eager computes
    l_eager, _, _ = _train(_unet(), accel.AccelOptions(cuda_graphs=False))
    assert l_fast == pytest.approx(l_eager, rel=5e-3)


@cuda
def test_work_between_steps_uses_the_graphs_pool_and_never_corrupts_a_replay():
    """`StepRunner.scratch` (the epoch's scoring, samples): eager work between replays allocates from the graphs'
    idle pool (torch >= 2.8), so reserved memory does not grow, and the training losses are those of a run with no
    such work; a tensor that outlives the scratch work makes the runner capture again, and keeps its values."""
    from lora_trainer.accel.graphs import _mem_pool_usable

    g = torch.Generator(device="cuda").manual_seed(9)
    probe = {"x": torch.randn(2, 4, 16, 16, device="cuda", generator=g),
             "t": torch.full((2,), 500, device="cuda"), "ctx": torch.randn(2, 7, 32, device="cuda", generator=g)}
    seen: dict[str, object] = {}

    def score(i, runner, unet):
        if i not in (5, 9):
            return
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        with runner.scratch(), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(probe["x"], probe["t"], probe["ctx"], return_dict=False)[0].float()
            seen[f"cpu{i}"] = out.cpu()
            if i == 9:
                seen["kept"] = out * 1.0  # stays on the GPU: the graphs must be captured again
        seen[f"grew{i}"] = torch.cuda.memory_reserved() - reserved
        seen[f"graphs{i}"] = runner.stats["graphs"]

    l_plain, _, _ = _train(_unet(), accel.AccelOptions())
    l_scored, runner, _ = _train(_unet(), accel.AccelOptions(), between=score)
    assert runner.uses_graphs, runner.disabled_reason
    # the scratch work changed nothing in training (corruption would be far off: kernels' atomics differ slightly)
    assert l_scored == pytest.approx(l_plain, rel=1e-3)
    assert torch.equal(seen["kept"].cpu(), seen["cpu9"])  # not overwritten by steps 10 and 11
    if _mem_pool_usable():
        # the forward pass fit in the graphs' idle pool: at most one new 2 MiB segment for small blocks (measured)
        assert seen["grew5"] <= 2 * 2**20
        assert runner.stats["graphs"] == seen["graphs9"] + 1  # captured again after step 9's kept tensor


@cuda
def test_work_between_steps_without_a_mempool_releases_the_graphs_when_memory_is_tight(monkeypatch):
    """torch < 2.8 (no MemPool; simulated) with little free GPU memory (simulated): `scratch` releases the graphs and
    their pool before the work, the next step captures again, and training computes what it computes without."""
    from lora_trainer.accel import graphs

    monkeypatch.setattr(graphs, "_mem_pool_usable", lambda: False)
    monkeypatch.setattr(graphs, "_little_free", lambda device: True)
    g = torch.Generator(device="cuda").manual_seed(9)
    probe = (torch.randn(2, 4, 16, 16, device="cuda", generator=g), torch.full((2,), 500, device="cuda"),
             torch.randn(2, 7, 32, device="cuda", generator=g))
    seen: dict[str, int] = {}

    def score(i, runner, unet):
        if i == 5:
            seen["graphs"] = runner.stats["graphs"]
            with runner.scratch(), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                unet(*probe, return_dict=False)[0].float().cpu()
            seen["left"] = len(runner._graphs)

    l_plain, _, _ = _train(_unet(), accel.AccelOptions())
    l_scored, runner, _ = _train(_unet(), accel.AccelOptions(), between=score)
    assert runner.uses_graphs, runner.disabled_reason
    assert seen["left"] == 0 and runner.stats["graphs"] == seen["graphs"] + 1  # released, then captured again
    assert l_scored == pytest.approx(l_plain, rel=1e-3)


def _scaler():
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", init_scale=2.0**12)
    return torch.cuda.amp.GradScaler(init_scale=2.0**12)


@cuda
def test_fp16_loss_scaling_in_graphs_matches_eager_and_skips_overflow():
    # Step 9 (a replay) gets an infinite loss: the step must be skipped and the scale halved on
    # the GPU, exactly as GradScaler does eagerly.
    def run(opts):
        scaler = _scaler()
        losses, runner, weights = _train(_unet(), opts, steps=12, scaler=scaler, dtype=torch.float16, inf_at=9)
        return losses, runner, weights, scaler.get_scale()

    l_eager, _, w_eager, s_eager = run(accel.AccelOptions(cuda_graphs=False))
    l_graph, r_graph, w_graph, s_graph = run(accel.AccelOptions())
    assert r_graph.uses_graphs, r_graph.disabled_reason
    assert r_graph.stats["graph_replays"] == 12 - accel.AccelOptions().graph_warmup
    assert s_graph == s_eager == 2.0**11
    finite = [i for i in range(12) if i != 9]
    assert [l_graph[i] for i in finite] == pytest.approx([l_eager[i] for i in finite], rel=5e-3)
    cat = lambda w: torch.cat([v.flatten() for _, v in sorted(w.items())])
    assert torch.isfinite(cat(w_graph)).all()
    assert float((cat(w_graph) - cat(w_eager)).norm() / cat(w_eager).norm()) < 1e-2


@cuda
def test_lowp_norms_and_fp8_close_on_gpu():
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(32, 64).cuda().to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = gn(x)
        assert ref.dtype == torch.float32  # stock autocast runs norms in fp32
        accel.lowp_norms(gn)
        out = gn(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    lin = torch.nn.Linear(256, 128).cuda().to(torch.bfloat16).requires_grad_(False)
    q = accel.Fp8Linear(lin)
    xi = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert float((q(xi).float() - lin(xi).float()).norm() / lin(xi).float().norm()) < 0.08


@cuda
def test_nhwc_group_norm_on_gpu_matches_torch_and_trains_in_graphs():
    """accel/group_norm_nhwc.py's Triton kernels compiled for the GPU: SD's shapes in bf16 as close to the fp32 norm
    as torch's kernel, channels_last kept; a channels_last UNet trained in CUDA graphs with them follows the same
    losses as with torch's GroupNorm."""
    from lora_trainer.accel.fused_math import fused_math_available
    from lora_trainer.accel.group_norm_nhwc import group_norm_nhwc

    if not fused_math_available("cuda"):
        pytest.skip("no Triton here")
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((1, 320, 128, 128), (2, 960, 32, 32), (8, 1280, 8, 8), (1, 2560, 16, 16)):
        c = shape[1]
        x = (torch.randn(shape, device="cuda", generator=g) * 2 + 1).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(c, device="cuda", generator=g).bfloat16()
        b = torch.randn(c, device="cuda", generator=g).bfloat16()
        dy = torch.randn(shape, device="cuda", generator=g)
        y = group_norm_nhwc(x, 32, w, b, 1e-5)
        (y.float() * dy).sum().backward()
        assert y.is_contiguous(memory_format=torch.channels_last) and x.grad.is_contiguous(
            memory_format=torch.channels_last)
        ex = x.detach().float().requires_grad_()
        ref = torch.nn.functional.group_norm(ex, 32, w.float(), b.float(), 1e-5)
        (ref * dy).sum().backward()
        tx = x.detach().contiguous().requires_grad_()
        theirs = torch.nn.functional.group_norm(tx, 32, w, b, 1e-5)
        (theirs.float() * dy).sum().backward()
        for ours, torchs, exact in ((y, theirs, ref), (x.grad, tx.grad, ex.grad)):
            err, err_torch = (ours.float() - exact).abs().max(), (torchs.float() - exact).abs().max()
            assert err <= 1.5 * err_torch + 1e-6, (shape, float(err), float(err_torch))
    # channels_last end to end (NHWC norms, the 1×1 lean products, NHWC transformer outputs) in graphs: the losses
    # of channels_last with torch's norm, and of plain eager peft within bf16 autocast's tolerance
    unet = _unet()
    l_nhwc, runner, _ = _train(unet, accel.AccelOptions(channels_last=True))
    assert runner.uses_graphs, runner.disabled_reason
    assert accel.norms.nhwc_group_norms(unet) > 0
    l_torch, _, _ = _train(_unet(), accel.AccelOptions(channels_last=True, nhwc_group_norm=False))
    assert l_nhwc == pytest.approx(l_torch, rel=5e-3)
    l_ref, _, _ = _train(_unet(), accel.AccelOptions.off())
    assert l_nhwc == pytest.approx(l_ref, rel=2e-2)


@cuda
def test_fused_geglu_on_gpu_matches_torch_in_a_cuda_graph_and_trains():
    """accel/geglu.py's kernels compiled for the GPU: SD's shapes in bf16 no further from the fp32 math than torch's
    bf16 GELU and products; forward and backward captured in a CUDA graph and replayed on new values; a UNet
    trained in graphs with them follows diffusers' GEGLU's losses."""
    from lora_trainer.accel.fused_math import fused_math_available
    from lora_trainer.accel.geglu import _checked, check_kernels, geglu

    if not fused_math_available("cuda"):
        pytest.skip("no Triton here")
    assert check_kernels("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)

    def both(hg, dy, fn):
        hg = hg.detach().requires_grad_()
        y = fn(hg)
        y.backward(dy)
        return y.float(), hg.grad.float()

    def eager(hg):
        h, gate = hg.chunk(2, dim=-1)
        return h * torch.nn.functional.gelu(gate)

    for shape in ((8, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 77, 2 * 640)):
        hg = (torch.randn(shape, device="cuda", generator=g) * 2).bfloat16()
        dy = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", generator=g).bfloat16()
        ours, torchs, exact = both(hg, dy, geglu), both(hg, dy, eager), both(hg.float(), dy.float(), eager)
        for o, t, e in zip(ours, torchs, exact):
            err, err_torch = (o - e).abs(), (t - e).abs()
            assert err.max() <= 1.01 * err_torch.max() + 1e-6 and err.mean() <= err_torch.mean(), shape
    # in a CUDA graph: warmed up on a side stream, captured, replayed on new inputs
    hg = torch.randn(2, 1024, 2 * 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 1024, 1280, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            hg.grad = None
            geglu(hg).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    hg.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = geglu(hg)
        y.backward(dy)
        assert not check_kernels("cuda", torch.float16, "tanh")  # never compiled inside a capture
    assert (torch.device("cuda", torch.cuda.current_device()), torch.float16, "tanh") not in _checked
    with torch.no_grad():
        hg.copy_(torch.randn(hg.shape, device="cuda", generator=g) * 2)
        dy.copy_(torch.randn(dy.shape, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    want_y, want_grad = both(hg, dy, geglu)
    assert torch.equal(y.float(), want_y) and torch.equal(hg.grad.float(), want_grad)
    # a UNet trained in graphs: the fused GEGLUs taken, diffusers' losses within bf16's reach
    unet = _unet()
    l_fused, runner, _ = _train(unet, accel.AccelOptions(fused_geglu=True))
    assert runner.uses_graphs, runner.disabled_reason
    assert any("forward" in m.__dict__ for m in unet.modules() if type(m).__name__ == "GEGLU")
    l_eager, _, _ = _train(_unet(), accel.AccelOptions(fused_geglu=False))
    assert l_fused == pytest.approx(l_eager, rel=5e-3)


def _flux_losses(fused: bool, steps: int = 10):
    """A small Flux (2 double + 2 single blocks, 256 wide) trained through StepRunner as the engine does: bf16
    autocast, checkpointed blocks, fp32 trainable input/output layers (gradients cross every block's math)."""
    from lora_trainer.models.flux import FluxTransformer
    from lora_trainer.models.flux.block_math import EAGER_MATH
    from lora_trainer.models.flux.model import FluxParams, image_ids, text_ids

    params = FluxParams(hidden_size=256, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(16, 24, 24),
                        context_in_dim=64, vec_in_dim=32)
    torch.manual_seed(0)
    model = FluxTransformer(params).to("cuda", torch.bfloat16).requires_grad_(False)
    trained = [model.img_in.weight, model.final_layer.linear.weight]
    for p in trained:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.enable_gradient_checkpointing()
    opts = accel.AccelOptions(fused_math=fused)
    accel.prepare_model(model, opts, device="cuda")
    n_fused = sum(b.math is not EAGER_MATH for b in [*model.double_blocks, *model.single_blocks])
    opt = torch.optim.AdamW(trained, lr=1e-3, **accel.optimizer_kwargs("cuda"))
    ids = torch.cat((text_ids(2, 8, device="cuda"), image_ids(2, 16, 16, device="cuda")), dim=1)

    def loss_fn(b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(b["img"], ids[:, 8:], b["txt"], ids[:, :8], b["t"], b["y"], b["g"])
        return torch.nn.functional.mse_loss(out.float(), b["target"])

    runner = accel.StepRunner(loss_fn, trained, opt, opts, max_grad_norm=1.0, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    losses = []
    for _ in range(steps):
        b = {"img": torch.randn(2, 64, 64, device="cuda", generator=g),
             "txt": torch.randn(2, 8, 64, device="cuda", generator=g),
             "t": torch.rand(2, device="cuda", generator=g), "y": torch.randn(2, 32, device="cuda", generator=g),
             "g": torch.full((2,), 3.5, device="cuda"), "target": torch.randn(2, 64, 64, device="cuda", generator=g)}
        losses.append(runner.step(b).item())
    return losses, runner, n_fused


@cuda
def test_fused_flux_block_math_matches_eager_inside_cuda_graphs():
    from lora_trainer.accel import fused_math

    before = len(fused_math._failed)
    l_eager, _, n_eager = _flux_losses(fused=False)
    l_fused, runner, n_fused = _flux_losses(fused=True)
    assert fused_math._failed[before:] == []  # inductor compiled every call (no eager fallback)
    assert n_eager == 0 and n_fused == 4
    assert runner.stats["graph_replays"] == 10 - accel.AccelOptions().graph_warmup  # captured with the fused math
    # the same function: fp32 inside both; only where bf16 rounds the outputs may one ulp differ
    assert all(abs(a - b) <= 2e-3 * abs(b) for a, b in zip(l_fused, l_eager)), (l_fused, l_eager)


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_flux_attention_output_is_a_view_not_a_transposing_copy(fused):
    """q, k, v come laid out tokens-first (B, L, H, D) from the blocks' qkv math, eager or compiled, so the
    attention kernels write their output that way and the blocks' (B, L, H*D) is a view of it."""
    from lora_trainer.accel import fused_math
    from lora_trainer.models.flux import block_math
    from lora_trainer.models.flux.model import EmbedND

    heads, dim, n_txt, n_img = 4, 64, 16, 64
    g = torch.Generator("cuda").manual_seed(0)
    qkv = [torch.randn(1, n, 3 * heads * dim, device="cuda", dtype=torch.bfloat16, generator=g)
           for n in (n_img, n_txt)]
    scale = torch.ones(dim, device="cuda", dtype=torch.bfloat16)
    pe = EmbedND(dim, 10_000, (16, 24, 24))(torch.rand(1, n_txt + n_img, 3, device="cuda") * 8)
    single, double = block_math.single_qkv, block_math.double_qkv
    if fused:
        single, double = fused_math.fused(single), fused_math.fused(double)
    outs = [single(torch.cat(qkv[::-1], 1), heads, scale, scale, pe),
            double(qkv[0], qkv[1], heads, (scale, scale), (scale, scale), pe)]
    for q, k, v in outs:
        assert q.shape == (1, heads, n_txt + n_img, dim)
        assert all(t.transpose(1, 2).is_contiguous() for t in (q, k)), (q.stride(), k.stride())
        out = block_math.attend(q, k, v)
        assert out._is_view(), "attention's output was copied to (B, L, H*D)"
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.contiguous().float() for t in (q, k, v)))
        torch.testing.assert_close(out.float(), ref.transpose(1, 2).flatten(2), atol=2e-2, rtol=2e-2)


@cuda
def test_sdpa_attention_is_used():
    import torch.nn.functional as F

    unet = _unet()
    procs = {type(p).__name__ for p in unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}, procs  # diffusers' SDPA processor
    calls = []
    orig = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            unet(torch.randn(1, 4, 16, 16, device="cuda"), torch.tensor([10], device="cuda"),
                 torch.randn(1, 7, 32, device="cuda"))
    finally:
        F.scaled_dot_product_attention = orig
    assert calls


@cuda
def test_engine_accel_matches_eager_and_oom_message(tmp_path):
    """Through run_training on the GPU: accel on/off give the same losses and LoRA file
    (bf16 tolerance); running out of memory gives the user the engine's one-line advice."""
    from safetensors.torch import load_file

    from lora_trainer.errors import TrainingError
    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.train import run_training
    from lora_trainer.train.placement import place_bundle

    data = make_dataset(tmp_path / "d", n=2, repeats=8)
    results = {}
    for mode in ("off", "auto"):
        bundle = place_bundle(build_tiny_bundle("sd1"), "cuda", torch.bfloat16)
        config = tiny_config(data, tmp_path / mode, device="cuda", mixed_precision="bf16", accel=mode,
                             learning_rate=3e-3, batch_size=2)
        results[mode] = run_training(config, bundle=bundle)
    off, on = results["off"], results["auto"]
    assert off.steps == on.steps == 8
    assert on.losses == pytest.approx(off.losses, rel=3e-2)
    a, b = load_file(str(off.lora_path)), load_file(str(on.lora_path))
    assert a.keys() == b.keys()
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5
    assert num / den < 5e-2

    bundle = place_bundle(build_tiny_bundle("sd1"), "cuda", torch.bfloat16)
    config = tiny_config(data, tmp_path / "oom", device="cuda", mixed_precision="bf16", batch_size=2)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(free - (8 << 20), 0), dtype=torch.uint8, device="cuda")  # leave ~8 MiB
    try:
        with pytest.raises(TrainingError, match="ran out of memory"):
            run_training(config, bundle=bundle)
    finally:
        del hog
        torch.cuda.empty_cache()
