"""`python -m lora_trainer train --model CKPT --data DIR --name NAME --out DIR ...`: train a LoRA."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..config import PRESETS, TrainConfig

HELP = "Train a Kohya-format LoRA from a Kohya dataset folder (img/<repeats>_<name>/)."

# flag -> TrainConfig field, for flags that map one to one
_FLAGS: dict[str, tuple[str, type]] = {
    "model": ("model", str), "data": ("data", str), "reg_data": ("reg_data", str), "name": ("name", str),
    "out": ("output_dir", str), "rank": ("rank", int), "alpha": ("alpha", float), "conv_rank": ("conv_rank", int),
    "conv_alpha": ("conv_alpha", float), "lr": ("learning_rate", float), "text_encoder_lr": ("text_encoder_lr", float),
    "epochs": ("epochs", int), "max_steps": ("max_steps", int), "batch_size": ("batch_size", int),
    "grad_accum": ("gradient_accumulation_steps", int), "resolution": ("resolution", int), "seed": ("seed", int),
    "mixed_precision": ("mixed_precision", str), "device": ("device", str), "resume": ("resume", str),
    "optimizer": ("optimizer", str), "scheduler": ("lr_scheduler", str), "warmup_steps": ("lr_warmup_steps", int),
    "save_every_n_epochs": ("save_every_n_epochs", int), "save_every_n_steps": ("save_every_n_steps", int),
    "sample_every_n_epochs": ("sample_every_n_epochs", int), "clip_skip": ("clip_skip", int),
    "noise_offset": ("noise_offset", float), "min_snr_gamma": ("min_snr_gamma", float),
    "keep_tokens": ("keep_tokens", int), "save_precision": ("save_precision", str),
    "min_bucket_reso": ("min_bucket_reso", int), "max_bucket_reso": ("max_bucket_reso", int),
    "bucket_reso_steps": ("bucket_reso_steps", int),
    # Flux (kohya's names)
    "clip_l": ("clip_l", str), "t5": ("t5", str), "vae": ("vae", str), "blocks_to_swap": ("blocks_to_swap", int),
    "guidance_scale": ("guidance_scale", float), "timestep_sampling": ("timestep_sampling", str),
    "discrete_flow_shift": ("discrete_flow_shift", float), "sigmoid_scale": ("sigmoid_scale", float),
    "model_prediction_type": ("model_prediction_type", str), "t5_max_token_length": ("t5_max_token_length", int),
}
_SWITCHES = {"overwrite": "overwrite", "train_text_encoder": "train_text_encoder",
             "gradient_checkpointing": "gradient_checkpointing", "shuffle_caption": "shuffle_caption",
             "flip_aug": "flip_aug", "no_bucket": None, "cache_latents_to_disk": "cache_latents_to_disk",
             "fp8_base": "fp8_base", "cpu_offload_checkpointing": "cpu_offload_checkpointing",
             "train_t5": "train_t5"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="settings file (.toml or .json); flags override it")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="; ".join(f"{k}: {v.label}" for k, v in PRESETS.items()))
    p.add_argument("--model", metavar="CKPT", help="base checkpoint (.safetensors/.ckpt) or diffusers folder; "
                   "Flux.1: flux1-dev.safetensors (bf16/fp8) or a FluxPipeline folder")
    p.add_argument("--data", metavar="DIR", help="Kohya dataset: folder holding img/<repeats>_<name>/ (and reg/)")
    p.add_argument("--reg-data", metavar="DIR", help="regularisation folder (<repeats>_<class>/), default DATA/reg")
    p.add_argument("--name", help="LoRA name: OUT/NAME.safetensors")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--rank", type=int, help="LoRA rank (network_dim)")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--conv-rank", type=int, help="LoCon rank for 3x3 convs (0 = off)")
    p.add_argument("--conv-alpha", type=float)
    p.add_argument("--lr", type=float, help="learning rate (UNet)")
    p.add_argument("--text-encoder-lr", type=float, help="text-encoder learning rate (with --train-text-encoder)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--resolution", type=int)
    p.add_argument("--min-bucket-reso", type=int, help="smallest bucket side (default: half the resolution)")
    p.add_argument("--max-bucket-reso", type=int, help="largest bucket side (default: twice the resolution)")
    p.add_argument("--bucket-reso-steps", type=int, help="bucket side granularity (default 64)")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--save-precision", choices=["fp16", "bf16", "float"])
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--optimizer", choices=["AdamW", "AdamW8bit", "Prodigy", "Lion", "Lion8bit", "Adafactor"])
    p.add_argument("--scheduler", choices=["constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                           "linear", "polynomial"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--noise-offset", type=float)
    p.add_argument("--min-snr-gamma", type=float)
    p.add_argument("--keep-tokens", type=int)
    p.add_argument("--save-every-n-epochs", type=int)
    p.add_argument("--save-every-n-steps", type=int)
    p.add_argument("--sample-prompt", action="append", metavar="PROMPT", help="sample prompt (repeatable)")
    p.add_argument("--sample-every-n-epochs", type=int)
    p.add_argument("--resume", metavar="STATE",
                   help="the <name>-state folder of a stopped run (its settings are used unless --config is given)")
    for flag in _SWITCHES:
        if flag != "train_t5":
            p.add_argument("--" + flag.replace("_", "-"), action="store_true", default=None)
    flux = p.add_argument_group("Flux.1 (text encoders and VAE are found beside --model when not given)")
    flux.add_argument("--clip-l", metavar="FILE", help="CLIP-L file (clip_l.safetensors)")
    flux.add_argument("--t5", metavar="FILE", help="T5-XXL file (t5xxl_fp16 or t5xxl_fp8_e4m3fn .safetensors)")
    flux.add_argument("--vae", metavar="FILE", help="Flux autoencoder (ae.safetensors)")
    flux.add_argument("--blocks-to-swap", type=int, metavar="N",
                      help="transformer blocks kept in CPU memory and streamed to the GPU (kohya's count, 0-38)")
    flux.add_argument("--guidance-scale", type=float, help="Flux.1 dev's distilled guidance while training (1.0)")
    flux.add_argument("--timestep-sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
                      help="how noise levels are drawn (default shift, with --discrete-flow-shift 3.1582)")
    flux.add_argument("--discrete-flow-shift", type=float)
    flux.add_argument("--sigmoid-scale", type=float)
    flux.add_argument("--model-prediction-type", choices=["raw", "additive", "sigma_scaled"])
    flux.add_argument("--t5-max-token-length", type=int, help="T5 tokens per caption (default 512 dev, 256 schnell)")
    flux.add_argument("--train-t5", action="store_true", default=None,
                      help="also train a LoRA on T5-XXL (kohya's train_t5xxl; lora_te3_ keys; T5 then runs every "
                           "step, which needs much more memory and time)")
    p.add_argument("--save-config", metavar="FILE", help="also write the final settings to FILE (.toml/.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without training")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.config:
        config = TrainConfig.load(args.config)
    elif args.resume and (Path(args.resume) / "config.json").is_file():
        # `train --resume OUT/name-state` alone continues with the stopped run's own settings.
        config = TrainConfig.load(Path(args.resume) / "config.json")
    else:
        config = TrainConfig()
    if args.preset:
        config = config.with_preset(args.preset)
    for flag, (field, kind) in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config, field, kind(value))
            if flag == "max_steps":
                config.epochs = 0
            elif flag == "epochs":
                config.max_steps = 0
    for flag, field in _SWITCHES.items():
        if getattr(args, flag, None):
            if field is None:
                config.enable_bucket = False
            else:
                setattr(config, field, True)
    if args.sample_prompt:
        config.sample_prompts = list(args.sample_prompt)
        if not config.sample_every_n_epochs:
            config.sample_every_n_epochs = 1
    return config


def _print_event(event) -> None:
    if event.kind == "plan":
        print(event.message, flush=True)
    elif event.kind == "step":
        parts = [f"step {event.step}/{event.total_steps}", f"epoch {event.epoch}/{event.total_epochs}",
                 f"loss {event.loss:.4f}", f"avg {event.smoothed_loss:.4f}", f"lr {event.lr:.2e}"]
        if event.it_per_s:
            parts.append(f"{event.it_per_s:.2f} it/s")
        if event.eta_s is not None:
            parts.append(f"ETA {int(event.eta_s) // 60}:{int(event.eta_s) % 60:02d}")
        if event.vram_bytes:
            parts.append(f"GPU memory {event.vram_bytes / 2**30:.1f} GiB")  # peak reserved by this process
        print("  ".join(parts), flush=True)
    elif event.kind in ("cache", "save", "sample", "stopped", "done") or (
            event.kind == "phase" and event.phase_done == 0):  # a phase's start: its steps would be too many lines
        print(event.message, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..train import plan_training, run_training

    config = config_from_args(args)
    if args.save_config:
        config.save(args.save_config)
    if args.dry_run:
        print(plan_training(config).text())
        return 0
    stop = threading.Event()

    def ask_stop(signum, frame):  # first Ctrl+C: finish the step and save; second: abort
        if stop.is_set():
            raise KeyboardInterrupt
        print("stopping after this step (Ctrl+C again to abort)...", file=sys.stderr, flush=True)
        stop.set()

    previous = signal.signal(signal.SIGINT, ask_stop) if threading.current_thread() is threading.main_thread() else None
    try:
        result = run_training(config, on_event=_print_event, stop=stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.stopped:
        print(f"Stopped at step {result.steps}: LoRA {result.lora_path}; resume with --resume {result.state_dir}")
    else:
        print(f"LoRA: {result.lora_path}")
    return 0
