"""What the engine asks of accel: one small options object, read from TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class AccelOptions:
    """Speed/memory switches. Every one of them leaves the trained weights' math unchanged except
    `fp8_base` (frozen base weights rounded to fp8: a low-VRAM preset's trade, off by default)."""

    enabled: bool = True  # False: plain peft forward, eager steps (the reference path)
    fused_lora: bool = True  # lean LoRA forward (lora_fast)
    # with fused_lora: a plain frozen Linear and its LoRA as one autograd function (quant.linear_with_lora, as over a
    # quantised base), the low-rank terms accumulated in place into the base's output and input gradient (no output
    # copy, no gradient add)
    lean_lora_product: bool = True
    cuda_graphs: bool = True  # capture the whole step per batch shape (graphs.StepRunner)
    graph_warmup: int = 2  # eager steps per shape before capture (cuDNN autotune, lazy inits)
    max_graphs: int = 8  # distinct batch shapes captured; later shapes run eagerly
    # NHWC convolutions, norms (below) and transformer outputs end to end (accel/channels_last.py), CUDA only:
    # H100 step -21 % at SD1.5 batch 8, -8 % at SDXL batch 1 with the NHWC GroupNorm (it lost with torch's:
    # bench/results/speed_cl_h100.md)
    channels_last: bool = True
    # with channels_last and lowp_norms: the GroupNorms read and write NHWC in Triton kernels (group_norm_nhwc.py)
    # where torch's kernel copies to NCHW and back; off: torch's
    nhwc_group_norm: bool = True
    lowp_norms: bool = True  # GroupNorm/LayerNorm in the autocast dtype (norms.py)
    # diffusers' GEGLU feed-forward gate (h·gelu(g)) in one Triton kernel each way (accel/geglu.py), CUDA only, where
    # eager runs a GELU and a multiply forward, three kernels backward. H100, SD1.5 batch 8 with channels_last:
    # step 66.8 -> 63.2 ms (-5.4 %; bench/results/speed_geglu_h100.md)
    fused_geglu: bool = True
    fp8_base: bool = False  # frozen Linear/Conv2d weights in float8 (low-VRAM presets)
    # the fp8 e4m3 frozen Linears' forward products (fp8_base's, or a Flux fp8 base) on fp8 tensor cores, inputs
    # rounded to fp8 per row (CUDA compute capability >= 8.9). Measured: Flux's 24 GB preset +10 % it/s on an H100
    # (bench/results/flux_vs_kohya_h100_dequant.md), losses up to 4.3e-4 (relative) from the eager bf16 reference's
    # over 20 steps on random weights where the default's are up to 2.7e-4 (flux_profile_h100.md); off, since the
    # effect on a real LoRA's quality (every activation rounded) is unmeasured
    fp8_matmul: bool = False
    fp8_matmul_backward: bool = False  # with fp8_matmul: the input-gradient products on fp8 too (grads rounded per row)
    # torch.compile each transformer block (opt-in): +10% at SD1.5 batch 8 on an H100 for ~35 s of
    # compiling before the first step (bench/results/speed_h100.md); inductor caches it on disk.
    compile_blocks: bool = False
    # Flux blocks' weightless math (q/k RMS norms, rotary embedding) fused by torch.compile where CUDA and Triton
    # are (accel/fused_math.py): the same function, fewer passes over memory; compiled at the first steps.
    fused_math: bool = True
    # a checkpointed block's recomputation keeps the frozen weights it dequantises for that block's backward (the
    # input gradients) instead of dequantising them again (quant.weights_kept_for_backward): one block's weights in
    # the compute dtype held a little longer. Flux 24 GB on an H200: +3.3 % it/s, +0.045 GiB peak
    # (bench/results/flux_vs_kohya_h200_keep.md)
    keep_recomputed_weights: bool = True
    # the LoRA adapters added in the UNet's upload thread while the latents are cached (train/engine.py), not after
    # it: part of the injection's CPU work off the path to the first step (both hold the GIL): SDXL 0.2-1.3 s on an
    # H100, SD1.5 nothing measurable (bench/results/e2e_vs_kohya_h100_defaults.md)
    early_lora: bool = True
    # the Triton kernels' checks (GEGLU, NHWC GroupNorm: import Triton, compile or load them, compare one run with
    # torch's math) in a thread from the run's start (prepare.check_kernels_early) instead of in prepare_model: 0.5-0.6 s
    # on the path to the first step on a warm H100, 3.5 s where Triton compiles (a machine's first run;
    # bench/results/e2e_vs_kohya_h100_final_write.md); off until measured (the e2e variant `early_check`)
    early_kernel_check: bool = False

    @classmethod
    def from_config(cls, config: Any) -> AccelOptions:
        """`config.accel`: "auto" (default) | "off"; `config.fp8_base`, `config.cuda_graphs`,
        `config.channels_last` are honoured when the config has them."""
        mode = str(getattr(config, "accel", "auto") or "auto").lower()
        opts = cls(enabled=mode != "off")
        for f in fields(cls):
            if f.name != "enabled" and hasattr(config, f.name):
                setattr(opts, f.name, type(f.default)(getattr(config, f.name)))
        if not opts.enabled:
            opts.fused_lora = opts.cuda_graphs = opts.channels_last = opts.lowp_norms = opts.fused_geglu = False
            opts.compile_blocks = opts.fused_math = opts.keep_recomputed_weights = opts.early_lora = False
        return opts

    @classmethod
    def off(cls) -> AccelOptions:
        return cls(enabled=False, fused_lora=False, cuda_graphs=False, lowp_norms=False, compile_blocks=False,
                   fused_math=False, fused_geglu=False, keep_recomputed_weights=False, early_lora=False)


def optimizer_kwargs(device: torch.device | str) -> dict[str, Any]:
    """Extra torch.optim.Adam/AdamW kwargs: one fused kernel for all LoRA tensors on CUDA, and
    capturable so the step can live inside a CUDA graph. Empty on the CPU."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return {}
    return {"fused": True, "capturable": True}


def describe(opts: AccelOptions, device: torch.device | str = "cuda") -> str:
    if not opts.enabled:
        return "accel: off (plain peft forward, eager steps)"
    on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    parts = []
    if opts.fused_lora:
        parts.append("fused LoRA forward")
    if opts.cuda_graphs:
        parts.append("CUDA graphs per batch shape" if on_cuda else "eager steps (no CUDA for graphs)")
    if opts.channels_last:
        parts.append("channels_last" + (" with NHWC GroupNorms" if opts.nhwc_group_norm and opts.lowp_norms
                                        and on_cuda else ""))
    if opts.lowp_norms and on_cuda:
        parts.append("norms in the autocast dtype")
    if opts.fused_geglu and on_cuda:
        parts.append("GEGLU in one kernel each way")
    if opts.fp8_base:
        parts.append("fp8 base weights")
    if opts.fp8_matmul and on_cuda:
        parts.append("fp8 products" + (" forward and backward" if opts.fp8_matmul_backward else " forward"))
    if opts.compile_blocks and on_cuda:
        parts.append("torch.compile per transformer block (about 30-60 s before the first step)")
    return "accel: " + (", ".join(parts) or "nothing enabled")
