"""`python -m lora_trainer demo [--out DIR]`: train a LoRA on the built-in demo model, offline, on the CPU.

The package ships a small SD1-architecture model pretrained by us on synthetic shapes, never a
star (`lora_trainer.demo`). The demo draws sixteen star pictures captioned "yellow demostar, blue
background", adds the synthetic WD14 tagger's confident tags through the real tagger code, prepares
a Kohya folder with the real preparer, writes as many pictures of the shapes the model already knows, captioned
with their names, as the run's leak-check set (never trained on: the report measures leakage on them), trains a
LoRA on the CPU and writes an A/B image: the same
prompts and seeds without the LoRA and with the LoRA loaded back from the saved file. How far the
LoRA gets towards drawing a star is measured in docs/demo-model.md.

`--tiny` runs the same pipeline on a tiny random model in seconds (for tests; its pictures mean nothing).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

HELP = "Train a LoRA on the built-in demo model: the whole pipeline on the CPU, no downloads."

TRIGGER = "demoshape"  # --tiny
PROMPT = f"{TRIGGER}, red theme, simple background"
SIZE = 64
# the A/B image: one column per prompt, row 1 without the LoRA, row 2 with it (same seeds)
AB_PROMPTS = ("yellow demostar, blue background", "red demostar, white background",
              "white demostar, black background", "orange demostar, teal background")
AB_SEED = 7
DEMO_EPOCHS = 80  # 16 pictures at batch 4: 320 steps
# the leak-check set (`leak_check_dir`): pictures of the other, seen shapes (scene seed = training seed +
# OTHERS_SEED, apart from the seeds the bench readings prompt with) in DEMO/leak-check/, never trained on
OTHERS_SEED, OTHERS_DIR = 100, "leak-check"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="./lora-trainer-demo", help="folder for everything the demo writes")
    p.add_argument("--epochs", type=int, default=0, help=f"training epochs (default {DEMO_EPOCHS}; 4 with --tiny)")
    p.add_argument("--images", type=int, default=0, help="training pictures (default 16; 10 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of the demo model "
                   "(seconds; for tests, its pictures mean nothing)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=1)


def make_images(folder: Path, count: int, seed: int) -> list[Path]:
    """Red discs and squares of varied size/position on light backgrounds (a few are landscape,
    so bucketing has something to do)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (SIZE * 3 // 2, SIZE) if i % 4 == 3 else (SIZE, SIZE)
        bg = tuple(int(v) for v in rng.integers(170, 245, 3))
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
        r = int(rng.integers(h // 5, h // 3))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        red = (int(rng.integers(190, 255)), int(rng.integers(0, 50)), int(rng.integers(0, 50)))
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if i % 2 == 0 else draw.rectangle)(box, fill=red)
        path = folder / f"shape_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        args.epochs, args.images = args.epochs or 4, args.images or 10
        return run_tiny(args)
    args.epochs, args.images = args.epochs or DEMO_EPOCHS, args.images or 16
    return run_demo(args)


def run_tiny(args: argparse.Namespace) -> int:
    import torch

    from ..config import TrainConfig
    from ..dataset.prepare import prepare_dataset
    from ..lora import applied_lora
    from ..models.loader import load_model
    from ..models.tiny import write_tiny_checkpoint
    from ..tagger.demo_model import write_demo_tagger
    from ..tagger.engine import Tagger
    from ..tagger.folder import tag_folder
    from ..tagger.thresholds import TagOptions
    from ..train import run_training
    from ..train.sampling import generate, save_png, side_by_side
    from .train import _print_event

    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"Demo folder: {out}")

    checkpoint = write_tiny_checkpoint(out / "model", "sd1", seed=args.seed)
    print(f"1/5 tiny SD1 checkpoint: {checkpoint}")

    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    make_images(images, args.images, args.seed)
    tagger = Tagger.load(write_demo_tagger(out / "tagger"), provider="cpu")
    tagged = tag_folder(images, tagger, TagOptions(trigger=TRIGGER), mode="overwrite")
    example = next(iter(tagged.captions.items()))
    print(f"2/5 {len(tagged.captions)} images captioned by the demo WD14 tagger (e.g. {example[0]}: '{example[1]}')")

    dataset = prepare_dataset(images, out / "dataset", TRIGGER, repeats=2, resolution=SIZE)
    usable = dataset.manifest["subsets"][0]["counts"]["usable"]
    print(f"3/5 Kohya dataset: {dataset.out}/img/2_{TRIGGER}/ ({usable} images x 2 repeats)")

    config = TrainConfig(
        model=str(checkpoint), data=str(dataset.out), output_dir=str(out / "lora"), name="demo-lora",
        overwrite=True, resolution=SIZE, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
        rank=8, alpha=8.0, learning_rate=2e-3, train_text_encoder=True, text_encoder_lr=1e-3,
        epochs=args.epochs, batch_size=2, seed=args.seed, device=args.device, save_precision="fp16",
        sample_prompts=[PROMPT], sample_every_n_epochs=args.epochs, sample_steps=12, sample_cfg_scale=5.0,
        activation_text=TRIGGER, log_every=5)
    config.save(out / "lora" / "demo-lora.toml")
    device = torch.device(args.device)
    bundle = load_model(checkpoint, dtype=torch.float32, device=device)
    print("4/5 training:")
    result = run_training(config, bundle=bundle, on_event=_print_event, owns_bundle=True)

    # A/B: the base model, then the same model with the saved LoRA file loaded back (same seed).
    kwargs = {"seed": config.sample_seed, "steps": config.sample_steps, "cfg_scale": config.sample_cfg_scale,
                  "width": SIZE * 2, "height": SIZE * 2}
    without = generate(bundle, [PROMPT], **kwargs)[0]
    with applied_lora(bundle, result.lora_path):
        with_lora = generate(bundle, [PROMPT], **kwargs)[0]
    ab = save_png(side_by_side(without, with_lora), out / "ab.png")
    print(f"5/5 A/B image (prompt '{PROMPT}', seed {config.sample_seed}): {ab}")
    print()
    print(f"LoRA:          {result.lora_path}")
    print(f"User metadata: {Path(result.lora_path).with_suffix('.json')}")
    print(f"Settings:      {out / 'lora' / 'demo-lora.toml'}")
    print(f"Samples:       {', '.join(str(p) for p in result.samples)}")
    print(f"A/B image:     {ab}")
    print(f"Loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} ({result.steps} steps, "
          f"{time.perf_counter() - started:.0f} s)")
    if result.report:  # the "did it learn?" report, as `train` prints it
        from ..train.report import report_text

        print(report_text(result.report))
    return 0


def demo_config(model: str, data: Path, output_dir: Path, *, epochs: int, seed: int, device: str,
                leak_check: Path | None = None):
    """The demo's training settings (measured on the demo model: docs/demo-model.md). `data` is a Kohya dataset
    folder; `leak_check` the folder of the other shapes' pictures with their captions (`run_demo` writes them),
    never trained on: the report measures leakage on them."""
    from ..config import TrainConfig
    from ..demo import TRIGGER

    return TrainConfig(
        model=model, data=str(data), output_dir=str(output_dir), name="demo-lora", overwrite=True,
        resolution=SIZE, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
        # UNet LoRA only, min-SNR 5: on the demo model the text encoder's LoRA added no lesson and made some runs
        # override the other shapes' prompts; min-SNR 5 raised the lesson on every seed (docs/demo-model.md)
        rank=8, alpha=8.0, learning_rate=3e-3, train_text_encoder=False, min_snr_gamma=5.0,
        epochs=epochs, batch_size=4, seed=seed, device=device, save_precision="fp16",
        save_state=False, activation_text=TRIGGER, log_every=10,
        validate_every_n_epochs=4,  # the report's scoring costs about an epoch of training: every 4th keeps it ~1/5
        leak_check_dir=str(leak_check) if leak_check is not None else "")


def ab_grid(rows: list[list], labels: tuple[str, str] = ("without LoRA", "with LoRA"), scale: int = 2):
    """Rows of pictures (enlarged `scale` times, sharp pixels) under a label each."""
    from PIL import Image, ImageDraw

    size = rows[0][0].width * scale
    strip = 14
    canvas = Image.new("RGB", (size * len(rows[0]), (size + strip) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = r * (size + strip)
        draw.text((3, y + 1), label, fill="black")
        for c, image in enumerate(row):
            canvas.paste(image.resize((size, size), Image.NEAREST), (c * size, y + strip))
    return canvas


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .. import demo
    from ..dataset.prepare import prepare_dataset
    from ..demo.dataset import write_concept_images, write_other_images
    from ..demo.measure import generate_batch
    from ..demo.world import to_pil
    from ..lora import applied_lora
    from ..models.loader import load_model
    from ..tagger.demo_model import write_demo_tagger
    from ..tagger.engine import Tagger
    from ..tagger.folder import tag_folder
    from ..tagger.thresholds import TagOptions
    from ..train import run_training
    from ..train.sampling import save_png

    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"Demo folder: {out}")
    print(f"1/5 demo model: {demo.DEMO_MODEL.name} (pretrained on shapes; its denoiser never saw a star)")

    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    write_concept_images(images, args.images, args.seed)
    tagger = Tagger.load(write_demo_tagger(out / "tagger"), provider="cpu")
    tagged = tag_folder(images, tagger, TagOptions(general_threshold=0.9, include_characters=False),
                        mode="append")
    example = next(iter(tagged.captions.items()))
    print(f"2/5 {len(tagged.captions)} star pictures, captions + demo WD14 tags "
          f"(e.g. {Path(example[0]).name}: '{example[1]}')")

    # the shapes the model already knows, with their own captions, as the leak-check set: what the star's trigger
    # must not override, never trained on; the report measures its leakage on them (train/validation.py)
    others = out / OTHERS_DIR
    shutil.rmtree(others, ignore_errors=True)
    shutil.rmtree(out / "other-shapes", ignore_errors=True)  # where an earlier demo wrote them
    write_other_images(others, args.images, args.seed + OTHERS_SEED)
    dataset = prepare_dataset(images, out / "dataset", demo.TRIGGER, repeats=1, resolution=SIZE)
    print(f"3/5 Kohya dataset: {dataset.out}/img/1_{demo.TRIGGER}/; leak-check set (the other shapes, not "
          f"trained on): {others}/")

    config = demo_config(str(demo.DEMO_MODEL), dataset.out, out / "lora", epochs=args.epochs, seed=args.seed,
                         device=args.device, leak_check=others)
    config.save(out / "lora" / "demo-lora.toml")
    bundle = load_model(demo.DEMO_MODEL, dtype=torch.float32, device=torch.device(args.device))

    def pictures() -> list:
        return to_pil(generate_batch(bundle, list(AB_PROMPTS), seed=AB_SEED, steps=20, cfg_scale=5.0, size=SIZE))

    without = pictures()
    print("4/5 training (UNet LoRA, rank 8):", flush=True)

    def progress(event) -> None:
        if event.kind == "step" and (event.step % 40 == 0 or event.step == event.total_steps):
            print(f"    step {event.step}/{event.total_steps}  loss {event.smoothed_loss:.4f}", flush=True)

    result = run_training(config, bundle=bundle, on_event=progress, owns_bundle=False)
    with applied_lora(bundle, result.lora_path):
        with_lora = pictures()
    ab = save_png(ab_grid([without, with_lora]), out / "ab.png")
    print(f"5/5 A/B image: {ab}")
    print(f"    prompts: {'; '.join(AB_PROMPTS)} (seeds {AB_SEED}..{AB_SEED + len(AB_PROMPTS) - 1})")
    print()
    print(f"LoRA:          {result.lora_path}")
    print(f"A/B image:     {ab}")
    print(f"Loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} ({result.steps} steps, "
          f"{time.perf_counter() - started:.0f} s)")
    if result.report:  # the "did it learn?" report, as `train` prints it
        from ..train.report import report_text

        print(report_text(result.report))
    return 0
