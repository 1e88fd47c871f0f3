"""The child process of bench/e2e_vs_kohya.py (`--child ours`): our CLI run in-process with timing hooks.

`child_ours` runs `python -m lora_trainer train ...` of the tree at `root` in this process, recording when each
phase (imports, dataset scan, model loading, latent and text caching, LoRA set-up, accel prepare, validation,
UNet upload) and each step happened, and writes them to `result_path` for the orchestrator. `VARIANTS` /
`apply_variant`: the A/B switches of `--variants` (one per run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def gpu_warmup() -> None:
    """A small bf16 convolution, group norm, attention and matmul, forward and backward: loads the kernel libraries
    (cuDNN, cuBLAS) a training step needs, which the first process on a freshly started machine reads from disk."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16):
        x = torch.randn(1, 320, 64, 64, device=device, requires_grad=True)
        conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(device)
        h = torch.nn.functional.group_norm(conv(x), 32)
        q = h.flatten(2).transpose(1, 2).reshape(1, 4096, 8, 40).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (y.float().square().mean() + (h.flatten(1) @ h.flatten(1).T).float().mean()).backward()
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ children
def child_ours(result_path: str, root: str, cli_args: list[str], variant: str = "") -> int:
    """Run our CLI in this process, recording when each phase and step happened (absolute times).
    `variant`: an A/B switch for this run only (see VARIANTS)."""
    t_start = time.time()
    sys.path.insert(0, root)
    try:  # the CLI's `train` does this first (lean_imports.py); the hooks' imports below would come before it
        from lora_trainer.lean_imports import lean_model_zoos

        lean_model_zoos()
    except ImportError:  # an older copy (--before)
        pass
    import torch

    import lora_trainer.train as train_pkg
    from lora_trainer import cli

    t_imported = time.time()
    steps: list[float] = []
    phases: dict[str, list[float]] = {}
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def hook(owner, name: str, label: str, *, span: bool = False, each: bool = False, only=None) -> None:
        """Time calls of owner.name; span=True: one phase from the first call's start to the last's end;
        each=True: a phase per call ("label 1", "label 2", ...)."""
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                if only is None or only(*args, **kwargs):
                    sync()
                    if each:
                        phases[f"{label} {sum(k.startswith(label + ' ') for k in phases) + 1}"] = [start, time.time()]
                    elif span and label in phases:
                        phases[label][1] = time.time()
                    else:
                        phases.setdefault(label, [start, time.time()])

        setattr(owner, name, wrapper)

    from lora_trainer import accel
    from lora_trainer.lora import network
    from lora_trainer.models import loader
    from lora_trainer.train import engine

    profile = _StartProfile(engine) if variant == "profile_start" else None
    hook(engine, "prepare_dataset", "scan dataset")
    # the smaller phases around them, for a profile of the path to the first step
    hook(engine, "check_model_file", "check header")
    hook(engine, "_import_loader_libraries", "loader imports")
    hook(engine, "claim_outputs", "claim outputs")
    hook(getattr(engine, "_Run", None), "_weight_dtype", "device check (CUDA init)")
    try:  # the Triton kernels' compile-and-compare, once per process and kind (accel/triton_check.py)
        from lora_trainer.accel import triton_check

        hook(triton_check, "_run", "triton check", each=True)
    except ImportError:
        pass
    try:
        from lora_trainer.accel import graphs

        hook(getattr(graphs, "StepRunner", None), "_capture", "graph capture", each=True)
    except ImportError:
        pass
    hook(loader, "load_model", "load model")
    try:  # the cache phase lives in train/caching.py (in engine.py in older copies, e.g. --before)
        from lora_trainer.train import caching as cache_phase
    except ImportError:
        cache_phase = engine
    hook(cache_phase, "cache_latents", "cache latents")
    hook(cache_phase, "cache_text_outputs", "cache text")
    hook(network, "inject_lora", "inject LoRA")
    hook(accel, "prepare_model", "accel prepare", span=True)
    try:
        from lora_trainer.train import validation

        hook(validation.Validator, "epoch", "validation", each=True)  # each epoch's scoring
    except ImportError:
        pass
    try:
        from lora_trainer.train import placement

        hook(placement.Placement, "to", "UNet to the GPU",
             only=lambda self, module, *_, **__: module is getattr(self, "_unet", None))
        hook(placement.Placement, "upload_in_background", "UNet upload started",
             only=lambda self, module, *_, **__: module is getattr(self, "_unet", None))
    except ImportError:
        placement = None
    original_run = train_pkg.run_training

    def run_training(config, *, on_event=None, **kwargs):
        if placement is not None:  # note which module is the UNet, for the hook above
            original_init = placement.Placement.__init__

            def init(self, bundle, *a, **k):
                original_init(self, bundle, *a, **k)
                self._unet = bundle.unet

            placement.Placement.__init__ = init

        def tee(event) -> None:
            if event.kind == "step":
                sync()
                steps.append(time.time())
            elif event.kind in ("save", "done"):
                phases.setdefault(event.kind, [time.time(), time.time()])
            if on_event is not None:
                on_event(event)

        return original_run(config, on_event=tee, **kwargs)

    train_pkg.run_training = run_training
    apply_variant("" if variant == "profile_start" else variant)
    error = None
    try:
        if profile is not None:
            profile.start()
        rc = cli.main(cli_args)
        if rc:
            error = f"exit code {rc}"
    except BaseException as e:  # noqa: BLE001 - recorded for the parent
        import traceback

        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"[:500]
    sync()
    result = {"t_start": t_start, "t_imported": t_imported, "t_end": time.time(), "steps": steps, "phases": phases,
              "error": error}
    if profile is not None:
        result["start_profile"] = profile.text
    if cuda:
        result.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                      peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 1 if error else 0


class _StartProfile:
    """cProfile from the CLI's start to the model file's header check (what runs before the first phase the hooks
    time: argument parsing, settings, the run's checks), for the warm-up run (`--warm-runs`: not counted)."""

    def __init__(self, engine) -> None:
        import cProfile

        self.profiler, self.text = cProfile.Profile(), ""
        original = engine.check_model_file

        def check_model_file(*args, **kwargs):
            if not self.text:
                self.stop()
            return original(*args, **kwargs)

        engine.check_model_file = check_model_file

    def start(self) -> None:
        self.profiler.enable()

    def stop(self) -> None:
        import io
        import pstats

        self.profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(12)
        self.text = out.getvalue()[-12000:]


VARIANTS = {
    "no_overlap": "UNet uploaded after caching, not beside it",
    "channels_last": "accel channels_last on",
    "gpu_warmup": "a thread runs a small bf16 conv/matmul/attention forward+backward at the start of run_training "
                  "(loads cuDNN/cuBLAS while the model loads)",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark = True",
    "no_validation": "no \"did it learn?\" scoring (validate_every_n_epochs = 0)",
    "rehearse_unet": "a thread runs one forward+backward of the UNet at the training batch's shape right after its "
                     "background upload (kernels and cuDNN plans set up while latents are cached)",
    "score_batch8": "the \"did it learn?\" scoring at least 8 pairs per forward pass (default: at least 4)",
    "score_at_batch": "the scoring at the training batch (default: at least 4 pairs per pass)",
    "early_lora": "accel early_lora on: the LoRA adapters added in the UNet's upload thread beside latent caching",
    "late_lora": "accel early_lora off: the LoRA adapters added after latent caching and the UNet's upload",
    "no_geglu": "accel fused_geglu off: diffusers' own GEGLU",
    "no_ahead": "each step's batch made after the step before has ended (its loss read), as before 2026-12-07",
    "early_check": "accel early_kernel_check on: the Triton kernels' checks in a thread from the run's start",
    "fast_exit": "the process ends with os._exit after the run (no interpreter or CUDA teardown)",
    "ahead": "the next step's batch made while the GPU runs the step (train/step.py AHEAD_DEVICES; the default)",
}
# variants that set one accel lever (AccelOptions field, value) where accel is on
LEVERS = {"channels_last": ("channels_last", True), "early_lora": ("early_lora", True),
          "early_check": ("early_kernel_check", True),
          "late_lora": ("early_lora", False), "no_geglu": ("fused_geglu", False)}


def apply_variant(variant: str) -> None:
    """Switch `variant` on for this run; "a+b" switches on both."""
    if "+" in variant:
        for one in variant.split("+"):
            apply_variant(one)
        return
    import torch

    from lora_trainer import accel

    if variant == "no_validation":
        from lora_trainer.train import validation

        validation.Validator.create = classmethod(lambda cls, *a, **k: None)
    elif variant in ("ahead", "no_ahead"):
        from lora_trainer.train import step

        step.AHEAD_DEVICES = ("cuda",) if variant == "ahead" else ()
    elif variant == "no_overlap":
        from lora_trainer.train import placement

        placement.Placement.upload_in_background = lambda self, module, *a, **k: False
    elif variant in LEVERS:
        original = accel.AccelOptions.from_config
        field, value = LEVERS[variant]

        def from_config(config):
            opts = original(config)
            setattr(opts, field, value and opts.enabled)
            return opts

        accel.AccelOptions.from_config = staticmethod(from_config)
    elif variant == "gpu_warmup":
        import threading

        import lora_trainer.train as train_pkg

        original_run = train_pkg.run_training

        def run_training(config, **kwargs):
            threading.Thread(target=gpu_warmup, daemon=True).start()
            return original_run(config, **kwargs)

        train_pkg.run_training = run_training
    elif variant in ("score_batch8", "score_at_batch"):
        from lora_trainer.train import validation

        least = 8 if variant == "score_batch8" else 1
        validation.scoring_batch = lambda config: (
            max(1, int(config.batch_size)) if config.gradient_checkpointing else max(int(config.batch_size), least))
    elif variant == "rehearse_unet":
        _rehearse_unet_variant()
    elif variant == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    elif variant == "fast_exit":
        pass  # e2e_vs_kohya.py's child ends the process itself
    elif variant:
        raise SystemExit(f"unknown variant {variant}")


def _rehearse_unet_variant() -> None:
    """rehearse_unet: after the UNet's background upload, one forward+backward (input gradients only, as for the
    frozen base in training) on zeros of the first step's shapes, on the upload's side stream, in a thread that the
    LoRA injection waits for."""
    import threading

    import torch

    from lora_trainer.train.family import ModelPlacement

    start_early, denoiser = ModelPlacement.start_early, ModelPlacement.denoiser

    def rehearse(self, future, stream) -> None:
        future.result()
        unet, cfg, dev = self.bundle.unet, self.config, self.device
        dtype = next(unet.parameters()).dtype
        b, r = int(cfg.batch_size), int(cfg.resolution) // 8
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            x = torch.zeros(b, unet.config.in_channels, r, r, device=dev, dtype=dtype, requires_grad=True)
            t = torch.full((b,), 500, device=dev, dtype=torch.long)
            hidden = torch.zeros(b, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
            kwargs = {}
            if unet.config.addition_embed_type == "text_time":
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(b, pooled, device=dev, dtype=dtype),
                                               "time_ids": torch.zeros(b, 6, device=dev, dtype=dtype)}
            with torch.autocast("cuda", dtype=dtype):
                out = unet(x, t, hidden, **kwargs).sample
            torch.autograd.grad(out.float().square().mean(), [x])
            del out, x
        stream.synchronize()
        torch.cuda.empty_cache()

    def new_start_early(self, then=None) -> bool:
        started = start_early(self, then)
        pending = self.placement._uploads.get(id(self.bundle.unet))
        if pending is not None and self.device.type == "cuda":
            self._rehearsal = threading.Thread(target=rehearse, args=(self, *pending), daemon=True)
            self._rehearsal.start()
        return started

    def new_denoiser(self) -> None:
        if getattr(self, "_rehearsal", None) is not None:
            self._rehearsal.join()
        denoiser(self)

    ModelPlacement.start_early, ModelPlacement.denoiser = new_start_early, new_denoiser
