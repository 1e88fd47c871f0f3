"""`python -m lora_trainer train --model CKPT --data DIR --name NAME --out DIR ...`: train a LoRA.

Options are declared in `OPTIONS` (flag → TrainConfig field, type, help) so that new model
families or launchers add theirs in one place; `--help` shows each one's default from TrainConfig.
Ctrl+C, SIGTERM and SIGHUP stop gracefully (`lora_trainer.signals`): the step finishes, the LoRA
and a resumable state are saved, and the exit status says which signal stopped the run.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import launch
from ..config import (
    MAX_BLOCKS_TO_SWAP,
    OPTIMIZERS,
    PREDICTION_TYPES,
    PRESETS,
    SCHEDULERS,
    TIMESTEP_SAMPLING,
    TrainConfig,
)

HELP = "Train a Kohya-format LoRA from a Kohya dataset folder (img/<repeats>_<name>/)."
EPILOG = ("The defaults shown apply where neither --preset nor --config sets a value; flags override both. "
          "Ctrl+C, `kill` (SIGTERM) or closing the terminal (SIGHUP) stops after the current step, saves "
          "OUT/NAME-stepN.safetensors and the resumable state OUT/NAME-state/, and exits with 128 + the "
          "signal's number (130 after Ctrl+C, 143 after SIGTERM); a second signal aborts without saving. "
          "Continue with --resume OUT/NAME-state.")


@dataclass(frozen=True)
class Option:
    """One `--flag VALUE` that sets one TrainConfig field."""

    flag: str  # "max-steps"
    field: str  # "max_steps"
    kind: type = str
    help: str = ""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    group: str = ""  # options sharing a group are mutually exclusive
    section: str = ""  # a titled block of --help (e.g. a model family's options)


FLUX = "Flux.1 (text encoders and VAE are found beside --model when not given)"


OPTIONS: list[Option] = [
    Option("model", "model", str, "base checkpoint (.safetensors/.ckpt, with an optional same-named .yaml) "
           "or diffusers folder; Flux.1: flux1-dev.safetensors (bf16/fp8) or a FluxPipeline folder", "CKPT"),
    Option("data", "data", str, "Kohya dataset: the folder holding img/<repeats>_<name>/ (and reg/), "
           "as written by `prepare`", "DIR"),
    Option("reg-data", "reg_data", str, "regularisation folder holding <repeats>_<class>/ (default: DATA/reg)",
           "DIR"),
    Option("name", "name", str, "LoRA name: the result is OUT/NAME.safetensors"),
    Option("out", "output_dir", str, "output folder for the LoRA, intermediate saves, samples and the state",
           "DIR"),
    Option("rank", "rank", int, "LoRA rank (network_dim): capacity and file size; 1..1024"),
    Option("alpha", "alpha", float, "LoRA alpha (network_alpha): the update is scaled by alpha/rank"),
    Option("conv-rank", "conv_rank", int, "LoCon rank for 3x3 convolutions (0 = plain LoRA)"),
    Option("conv-alpha", "conv_alpha", float, "LoCon alpha"),
    Option("lr", "learning_rate", float, "learning rate of the UNet LoRA"),
    Option("text-encoder-lr", "text_encoder_lr", float,
           "learning rate of the text-encoder LoRA with --train-text-encoder (0 = same as --lr)"),
    Option("epochs", "epochs", int, "passes over the dataset (img x repeats)", group="length"),
    Option("max-steps", "max_steps", int, "stop after this many optimizer steps instead of counting epochs "
           "(0 = use --epochs)", group="length"),
    Option("batch-size", "batch_size", int, "images per step"),
    Option("grad-accum", "gradient_accumulation_steps", int, "batches accumulated into one optimizer step"),
    Option("resolution", "resolution", int, "training resolution in pixels (512 for SD1.5, 1024 for SDXL)"),
    Option("min-bucket-reso", "min_bucket_reso", int, "smallest bucket side (0 = half the resolution)"),
    Option("max-bucket-reso", "max_bucket_reso", int, "largest bucket side (0 = twice the resolution)"),
    Option("bucket-reso-steps", "bucket_reso_steps", int, "bucket side granularity in pixels"),
    Option("seed", "seed", int, "random seed (the same seed and settings give the same LoRA)"),
    Option("mixed-precision", "mixed_precision", str, "training precision on a GPU (the CPU trains in fp32)",
           choices=("no", "fp16", "bf16")),
    Option("save-precision", "save_precision", str, "precision of the saved LoRA", choices=("fp16", "bf16", "float")),
    Option("device", "device", str, "auto, cpu, cuda, cuda:1 ... (auto: the GPU when there is one)"),
    Option("optimizer", "optimizer", str, "optimizer (8bit ones need bitsandbytes, Prodigy prodigyopt)",
           choices=OPTIMIZERS),
    Option("scheduler", "lr_scheduler", str, "learning-rate schedule", choices=SCHEDULERS),
    Option("warmup-steps", "lr_warmup_steps", int, "learning-rate warm-up steps"),
    Option("clip-skip", "clip_skip", int, "text-encoder layer to use, counted from the end (2 for many anime models)"),
    Option("noise-offset", "noise_offset", float, "noise offset (0.05-0.1 helps very dark/bright images; 0 = off)"),
    Option("min-snr-gamma", "min_snr_gamma", float, "Min-SNR loss weighting gamma (5 is the paper's; 0 = off)"),
    Option("keep-tokens", "keep_tokens", int, "caption tags kept in front when shuffling (e.g. 1 for a trigger word)"),
    Option("save-every-n-epochs", "save_every_n_epochs", int, "also save OUT/NAME-NNNNNN.safetensors every N epochs "
           "(0 = only at the end)"),
    Option("save-every-n-steps", "save_every_n_steps", int, "also save OUT/NAME-stepNNNNNNNN.safetensors every N "
           "steps (0 = off)"),
    Option("sample-every-n-epochs", "sample_every_n_epochs", int, "sample images every N epochs "
           "(with --sample-prompt; 0 = off)"),
    Option("resume", "resume", str, "the NAME-state folder of a stopped run: continue it (its saved settings are "
           "used unless --config is given)", "STATE"),
    Option("validate-every-n-epochs", "validate_every_n_epochs", int, 'the "did it learn?" report: score the LoRA '
           "every N epochs (0 = no report)"),
    Option("validation-split", "validation_split", float, 'share of the images held out for the "did it learn?" '
           "report (0 = the training images with fixed noise)", "SHARE"),
    Option("leak-check-dir", "leak_check_dir", str, 'pictures of other concepts with same-named .txt captions, '
           'never trained on: the "did it learn?" report measures leakage on them (default: the regularisation '
           "images, else pure noise)", "DIR"),
    # Flux (kohya's names)
    Option("clip-l", "clip_l", str, "CLIP-L file (clip_l.safetensors)", "FILE", section=FLUX),
    Option("t5", "t5", str, "T5-XXL file (t5xxl_fp16 or t5xxl_fp8_e4m3fn .safetensors)", "FILE", section=FLUX),
    Option("vae", "vae", str, "Flux autoencoder (ae.safetensors)", "FILE", section=FLUX),
    Option("blocks-to-swap", "blocks_to_swap", int, "transformer blocks kept in CPU memory and streamed to the "
           f"GPU (kohya's count, 0-{MAX_BLOCKS_TO_SWAP})", section=FLUX),
    Option("guidance-scale", "guidance_scale", float, "Flux.1 dev's distilled guidance while training",
           section=FLUX),
    Option("timestep-sampling", "timestep_sampling", str, "how noise levels are drawn (shift uses "
           "--discrete-flow-shift)", choices=TIMESTEP_SAMPLING, section=FLUX),
    Option("discrete-flow-shift", "discrete_flow_shift", float, "shift of the noise levels", section=FLUX),
    Option("sigmoid-scale", "sigmoid_scale", float, "scale for sigmoid/shift timestep sampling", section=FLUX),
    Option("model-prediction-type", "model_prediction_type", str, "how the model output becomes the prediction",
           choices=PREDICTION_TYPES, section=FLUX),
    Option("t5-max-token-length", "t5_max_token_length", int, "T5 tokens per caption (0 = 512 for dev, 256 for "
           "schnell)", section=FLUX),
]
# `--switch` → TrainConfig field set to True (None: see config_from_args)
SWITCHES: dict[str, tuple[str | None, str]] = {
    "overwrite": ("overwrite", "replace existing output files of the same name (default: refuse)"),
    "train-text-encoder": ("train_text_encoder", "also train a text-encoder LoRA"),
    "gradient-checkpointing": ("gradient_checkpointing", "less GPU memory, about 20%% slower steps"),
    "shuffle-caption": ("shuffle_caption", "shuffle the caption's tags every step (see --keep-tokens)"),
    "flip-aug": ("flip_aug", "randomly mirror images (not for asymmetric subjects or text)"),
    "no-bucket": (None, "crop every image to a square instead of aspect-ratio buckets"),
    "cache-latents-to-disk": ("cache_latents_to_disk", "keep the encoded images in OUT/.cache for later runs"),
    "fp8-base": ("fp8_base", "store the frozen base weights in fp8 (CUDA; less GPU memory)"),
    "cpu-offload-checkpointing": ("cpu_offload_checkpointing",
                                  "Flux: keep checkpointed block inputs in CPU memory (less GPU memory)"),
    "train-t5": ("train_t5", ("also train a LoRA on T5-XXL (kohya's train_t5xxl; lora_te3_ keys; T5 then "
                              "runs every step, which needs much more memory and time)")),
}
SWITCH_SECTIONS = {"train-t5": FLUX}  # switches listed in a section of --help
# Kept for code that reads the old tables: flag (underscored) → (field, type)
_FLAGS: dict[str, tuple[str, type]] = {o.flag.replace("-", "_"): (o.field, o.kind) for o in OPTIONS}
_SWITCHES = {flag.replace("-", "_"): field for flag, (field, _) in SWITCHES.items()}


def _default_text(field: str, help_text: str) -> str:
    value: Any = getattr(TrainConfig(), field, None)
    if value in ("", None) or (value == 0 and "(0 = " in help_text):  # "(0 = off)" says it already
        return ""
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


_METAVARS = {int: "N", float: "X"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--config", metavar="FILE", help="settings file (.toml or .json, TrainConfig field names); "
                   "flags override it")
    p.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                   help="settings for a GPU size: " + "; ".join(f"{k}: {v.label}" for k, v in PRESETS.items()))
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS:
        target: Any = p
        if o.section:
            if o.section not in sections:
                sections[o.section] = p.add_argument_group(o.section)
            target = sections[o.section]
        if o.group:
            if o.group not in groups:
                groups[o.group] = p.add_mutually_exclusive_group()
            target = groups[o.group]
        kwargs: dict[str, Any] = {"type": o.kind, "help": (o.help + _default_text(o.field, o.help)).replace("%", "%%")}
        if o.choices:
            kwargs["choices"] = list(o.choices)
        if o.metavar or not o.choices:
            kwargs["metavar"] = o.metavar or _METAVARS.get(o.kind, o.flag.split("-")[-1].upper())
        target.add_argument("--" + o.flag, dest=o.flag.replace("-", "_"), **kwargs)
    for flag, (_, text) in SWITCHES.items():
        section = SWITCH_SECTIONS.get(flag)
        if section and section not in sections:
            sections[section] = p.add_argument_group(section)
        target = sections[section] if section else p
        target.add_argument("--" + flag, action="store_true", default=None, help=text)
    p.add_argument("--sample-prompt", action="append", metavar="PROMPT",
                   help="prompt for sample images (repeatable; samples every epoch unless --sample-every-n-epochs)")
    p.add_argument("--save-config", metavar="FILE", help="also write the final settings to FILE (.toml/.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (images, buckets, steps) and exit")
    launch.add_arguments(p)  # --gpus N, --processes N


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
    return launch.apply_arguments(args, config)


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
    elif event.kind == "validation" and event.report and event.report.get("epochs"):
        from ..train.report import epoch_line

        print(epoch_line(event.report), flush=True)
    elif event.kind in ("cache", "save", "sample", "stopped", "done") or (
            event.kind == "phase" and event.phase_done == 0):  # a phase's start: its steps would be too many lines
        print(event.message, flush=True)


def _stopping_message(signum: int) -> str:
    from ..signals import signal_name

    return (f"{signal_name(signum)} received: stopping after this step and saving a resumable state "
            "(send it again to abort without saving)...")


def run(args: argparse.Namespace) -> int:
    from ..gc_freeze import building, run_scope
    from ..hidden_imports import hide_bitsandbytes
    from ..lean_imports import lean_model_zoos
    from ..paths import check_new_file
    from ..signals import GracefulStop, safe_streams

    config = config_from_args(args)
    if getattr(args, "own_process", False):  # process-wide import state: only in our own process
        hide_bitsandbytes(config.optimizer)  # diffusers and peft import it; few runs use it (hidden_imports.py)
        lean_model_zoos()  # diffusers' and transformers' model zoos: only the modules a run uses (lean_imports.py)
    with building():  # torch and the engine: no garbage to look for while they import (gc_freeze.py)
        from ..train import plan_training, run_training
        from ..train.report import report_text

    if args.save_config:
        check_new_file(args.save_config, "settings file", "give --save-config a file in a folder you can write to")
        config.save(args.save_config)
    if args.dry_run:
        print(plan_training(config).text())
        return 0
    code = launch.handle(config, args)  # several GPUs: launch one process per GPU, or be one of them
    if code is not None:
        return code
    stop = threading.Event()
    with safe_streams(), GracefulStop(lambda signum: stop.set(), message=_stopping_message) as stopper:
        with run_scope():  # the process ends with the run: its last clean-up need not walk everything
            result = run_training(config, on_event=_print_event, stop=stop)
        if result.report:
            print(report_text(result.report), flush=True)
        if result.stopped:
            print(f"Stopped at step {result.steps}: LoRA {result.lora_path}; continue with "
                  f"--resume {result.state_dir}", flush=True)
            return stopper.exit_code or 1
        if stopper.signum is not None:
            print("The run finished before the stop took effect.", file=sys.stderr, flush=True)
        print(f"LoRA: {result.lora_path}", flush=True)
    return 0
