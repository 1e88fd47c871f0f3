"""A1111's before/after grid: after a run, the WebUI's own txt2img draws the LoRA at a few weights next to
the model without it (rows: the last epoch saves and the final LoRA), one PNG beside the LoRA.

Everything from the WebUI (`modules.*`, the Lora extension's `networks`) is imported inside the
functions, so this file imports without a WebUI.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

AB_WEIGHTS = (0.4, 0.8, 1.0)


def grid_after_run(job: Any, settings: Any) -> None:
    """After a successful run: the A/B grid with the WebUI's own pipeline, into job.outputs
    (`settings`: the extension's, `lora_trainer_ab_grid` and `lora_trainer_ab_steps`)."""
    if not settings.get("lora_trainer_ab_grid", True) or not getattr(job, "lora_name", None):
        return
    if getattr(job, "stop_event", None) is not None and job.stop_event.is_set():
        return  # stopped or interrupted: the user wants the GPU back, not more images
    final = Path(job.outputs[0])
    epochs = [Path(p) for p in getattr(job, "saves", []) if Path(p).suffix == ".safetensors"]
    run_final = getattr(getattr(job, "result", None), "lora_path", None)  # = `final`, in the run folder
    skip = {final.resolve(), Path(run_final).resolve()} if run_final else {final.resolve()}
    epochs = [p for p in epochs if p.resolve() not in skip and p.is_file()][-3:]
    config = getattr(job, "config", None)
    prompt = (getattr(job, "prompt_text", "") or "").split(">", 1)[-1].strip() or job.lora_name
    sample_prompt = getattr(config, "sample_prompts", None)
    if isinstance(sample_prompt, (list, tuple)) and sample_prompt:
        prompt = str(sample_prompt[0]) or prompt
    size = int(getattr(config, "resolution", 512) or 512)
    before = job.message

    def on_image(done: int, total: int) -> None:  # the tab shows it as the run's "grid" phase
        job.phase, job.phase_done, job.phase_total = "grid", done, total
        job.message = f"Making the before/after grid with the WebUI: picture {done}/{total}"

    on_image(0, 1 + (len(epochs) + 1) * len(AB_WEIGHTS))
    job.eta_s = None  # not in the training ETA
    try:
        grid = make_ab_grid(final, epochs, prompt=prompt, seed=int(getattr(config, "seed", 42) or 42),
                            size=size, steps=int(settings.get("lora_trainer_ab_steps", 20) or 20),
                            on_image=on_image)
    finally:
        job.phase, job.message = "", before
    if grid is not None:
        job.outputs.append(str(grid))


@contextmanager
def _temporary_networks(paths: dict[str, Path]):
    """Make LoRA files outside the Lora folder usable as <lora:name:w> for a moment."""
    networks = sys.modules.get("networks")
    network = sys.modules.get("network")
    added: list[str] = []
    try:
        if networks is not None and network is not None:
            for alias, path in paths.items():
                if alias not in networks.available_networks:
                    entry = network.NetworkOnDisk(alias, str(path))
                    networks.available_networks[alias] = entry
                    networks.available_network_aliases[alias] = entry
                    added.append(alias)
        yield
    finally:
        for alias in added:
            networks.available_networks.pop(alias, None)
            networks.available_network_aliases.pop(alias, None)
        if networks is not None and added:
            for net in list(getattr(networks, "loaded_networks", [])):
                if net.name in added:
                    networks.loaded_networks.remove(net)
            networks.networks_in_memory = {k: v for k, v in getattr(networks, "networks_in_memory", {}).items()
                                           if k not in added}


@contextmanager
def _state_job(title: str, count: int):
    """A fresh `shared.state` job (clears an old Interrupt; the WebUI's Interrupt stops the grid)."""
    from modules import shared

    shared.state.begin(job=title)
    shared.state.job_count = count
    try:
        yield
    finally:
        shared.state.end()


def make_ab_grid(final: Path, epochs: list[Path], *, prompt: str, seed: int, size: int = 512,
                 steps: int = 20, weights: tuple[float, ...] = AB_WEIGHTS,
                 on_image: Any = None) -> Path | None:
    """One PNG next to `final`: rows = intermediate epochs + final, columns = no LoRA, then weights.

    Generated with the WebUI's own txt2img (`StableDiffusionProcessingTxt2Img` + `process_images`)
    under its queue lock, with `<lora:name:w>` in the prompt — exactly what the user will run.
    `on_image(done, total)` after each picture (the tab's progress).
    """
    from modules import processing, shared
    from modules.call_queue import queue_lock
    from PIL import Image, ImageDraw

    rows = [*epochs, final]
    aliases = {f"lora_trainer_ab_{i}_{p.stem}": p for i, p in enumerate(epochs)}
    names = [*aliases, final.stem]
    images: list[list[Any]] = []
    total, done = 1 + len(names) * len(weights), 0
    with queue_lock, _temporary_networks(aliases), _state_job("LoRA Trainer: A/B grid", len(names) * len(weights)):
        base = None
        for name in names:
            row = []
            for w in (0.0, *weights):
                if w == 0.0 and base is not None:
                    row.append(base)
                    continue
                text = prompt if w == 0.0 else f"{prompt} <lora:{name}:{w:g}>"
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=text, negative_prompt="", seed=seed, steps=steps,
                    width=size, height=size, cfg_scale=7.0, sampler_name="Euler a", batch_size=1, n_iter=1,
                    do_not_save_samples=True, do_not_save_grid=True)
                try:
                    res = processing.process_images(p)
                finally:
                    p.close()
                if shared.state.interrupted:
                    return None
                row.append(res.images[0])
                done += 1
                if on_image is not None:
                    on_image(done, total)
                if w == 0.0:
                    base = res.images[0]
            images.append(row)
    cell = images[0][0].size
    label_w, head_h = 160, 28
    grid = Image.new("RGB", (label_w + cell[0] * len(images[0]), head_h + cell[1] * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for c, w in enumerate((0.0, *weights)):
        draw.text((label_w + c * cell[0] + 6, 8), "no LoRA" if w == 0.0 else f"weight {w:g}", fill="black")
    for r, (path, row) in enumerate(zip(rows, images)):
        draw.text((6, head_h + r * cell[1] + 6), path.stem[-22:], fill="black")
        for c, img in enumerate(row):
            grid.paste(img, (label_w + c * cell[0], head_h + r * cell[1]))
    dest = final.with_name(f"{final.stem}.ab-grid.png")
    from io import BytesIO

    from ..paths import write_new_file

    buf = BytesIO()
    grid.save(buf, format="PNG")
    try:
        write_new_file(dest, buf.getvalue())
    except FileExistsError:
        dest = final.with_name(f"{final.stem}.ab-grid-{int(time.time())}.png")
        write_new_file(dest, buf.getvalue())
    return dest

