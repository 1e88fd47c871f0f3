"""Several processes through torch.distributed (gloo on the CPU): the multi-GPU path without GPUs.

The real thing end to end: `python -m lora_trainer train --processes 2 --device cpu` (torch's elastic
launcher, two worker processes, DDP over gloo) and plain `torchrun`, against the single-process engine.
Compared runs use AdamW with eps=1 so that float rounding (summation order differs between one process
and two) is not amplified into +-lr steps for near-zero gradients, as Adam does with its usual eps.
Each run starts 3 Python processes: these tests take about a minute on 2 idle cores.
"""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from flux_support import requires_flux_diffusers
from train_support import lora_tensors, make_dataset, tiny_sd1_ckpt  # noqa: F401

from lora_trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 300  # a hang fails the test instead of the CI job

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory) -> Path:
    """5 images in 2 buckets at 128 px (3 square, 2 wide): at 2 images per step each epoch ends the square
    bucket with a batch of 1, which one of two processes fills with a zero-weight copy."""
    sizes = [(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)]
    return make_dataset(tmp_path_factory.mktemp("ddp-data"), n=5, repeats=1, sizes=sizes)


def _config(ckpt: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    # 128 px, not the usual 64: at 64 px the tiny UNet's innermost maps are 2x2 and GroupNorm over them
    # is so ill-conditioned that fp32 gradients of one sample differ by 25% between a batch of 2 and of 1
    # (float64 agrees to 1e-8); at 128 px one and two processes agree to 1e-8.
    base = TrainConfig(model=str(ckpt), data=str(data), output_dir=str(out), name="ddp", resolution=128,
                       min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32, rank=4, alpha=4.0,
                       learning_rate=0.1, optimizer_args={"eps": 1.0}, epochs=3, batch_size=1, seed=11,
                       device="cpu", mixed_precision="no", save_precision="float", flip_aug=True,
                       gradient_accumulation_steps=2)
    return dataclasses.replace(base, **overrides)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", ""), str(ROOT),
                                                    os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run(cmd: list[str], *, env: dict[str, str] | None = None, stop_at: str | None = None
         ) -> subprocess.CompletedProcess:
    """Run `cmd` (stdout and stderr together); `stop_at`: send SIGINT (a terminal's Ctrl+C to the
    launcher) once this text appears in its output. Past RUN_TIMEOUT every process of the run prints
    its Python stacks (faulthandler) and is killed, and the test fails with that output."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env={**(env or _env()), "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    timer = threading.Timer(RUN_TIMEOUT, lambda: _abort_tree(psutil.Process(proc.pid)))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stop_at is not None and stop_at in line:
                proc.send_signal(signal.SIGINT)
                stop_at = None
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode != -signal.SIGKILL, f"the run hung; its stacks:\n{output}"
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def _abort_tree(root) -> None:
    import psutil

    family = [*root.children(recursive=True), root]
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
    time.sleep(3)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _train(*args: str, env: dict[str, str] | None = None, stop_at: str | None = None
           ) -> subprocess.CompletedProcess:
    """`python -m lora_trainer train ...` in a fresh process."""
    return _run([sys.executable, "-m", "lora_trainer", "train", *args], env=env, stop_at=stop_at)


def _settings(config: TrainConfig, path: Path) -> str:
    config.save(path)
    return str(path)


def _single(config: TrainConfig):
    """The reference: one process, the same settings with the per-process batch times two."""
    from lora_trainer.train import run_training

    return run_training(config)


def _losses(output: str) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in output.splitlines() if line.startswith("step ")]


def _assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6, msg=key)
    # and the runs did learn something (the up weights start at zero)
    assert max(v.abs().max().item() for k, v in ta.items() if "lora_up" in k) > 1e-3


# ---------------------------------------------------------------------- end to end, two processes
def test_torchrun_two_processes_train_the_single_process_lora(tmp_path, tiny_sd1_ckpt, two_buckets):
    """Plain torchrun, 2 gloo ranks x batch 1 = one process x batch 2: the same losses and the same LoRA
    within fp32 rounding. With the text encoder trained too (both LoRAs in DDP), captions shuffled (text
    encoded every step on every rank), gradient accumulation 2 (no_sync), flips, a padded tail batch and
    the fused LoRA forward (accel auto; CUDA graphs need a GPU)."""
    config = _config(tiny_sd1_ckpt, two_buckets, tmp_path / "two", train_text_encoder=True, shuffle_caption=True,
                     text_encoder_lr=0.05)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "lora_trainer", "-v", "train", "--config", _settings(config, tmp_path / "two.json")])
    assert proc.returncode == 0, proc.stdout
    # the fast path stays on under DDP: both ranks train through the fused LoRA forward (UNet and text encoder)
    fused = [int(n) for n in re.findall(r"accel.prepare_model: \{'fused_lora': (\d+)", proc.stdout)]
    assert len(fused) == 4 and min(fused) > 0, proc.stdout
    assert proc.stdout.count("step 6/6") == 1  # progress from rank 0 only
    assert proc.stdout.count("Data parallel on 2 CPU processes (gloo): batch 1 per process, 2 images per step") == 1
    single = _single(dataclasses.replace(config, output_dir=str(tmp_path / "one"), batch_size=2))
    _assert_same_lora(tmp_path / "two" / "ddp.safetensors", single.lora_path)
    assert _losses(proc.stdout) == pytest.approx(single.losses, rel=1e-4, abs=1e-4)
    meta = json.loads((tmp_path / "two" / "ddp.json").read_text(encoding="utf-8"))  # rank 0 wrote the rest
    assert meta["sd version"] == "SD1"


@pytest.mark.slow  # about 65 s on 2 idle cores: four runs, two of them with two processes
def test_stop_and_resume_on_two_processes_and_on_one(tmp_path, tiny_sd1_ckpt, two_buckets):
    """`train --processes 2` stopped by Ctrl+C on the launcher: both ranks stop after the same step and
    rank 0 saves; the run resumes on 2 processes (`train --resume STATE` alone) and, from a copy, on 1
    (its batch doubled to keep 2 images per step): both equal the uninterrupted single-process run.
    Latents and the text-encoder outputs are cached by rank 0 and sent to rank 1."""
    import shutil

    from lora_trainer.train import run_training

    config = _config(tiny_sd1_ckpt, two_buckets, tmp_path / "two")
    first = _train("--config", _settings(config, tmp_path / "s.json"), "--processes", "2", stop_at="step 2/6")
    assert first.returncode == 128 + signal.SIGINT, first.stdout
    assert "Traceback" not in first.stdout and "error:" not in first.stdout
    stopped_at = int(re.search(r"Stopped at step (\d+): LoRA", first.stdout).group(1))
    assert 2 <= stopped_at < 6
    state = tmp_path / "two" / "ddp-state"
    saved = json.loads((state / "config.json").read_text(encoding="utf-8"))
    assert saved["processes"] == 2 and saved["batch_size"] == 1
    assert not (tmp_path / "two" / "ddp.safetensors").exists()
    assert (tmp_path / "two" / f"ddp-step{stopped_at:08d}.safetensors").is_file()

    shutil.copytree(tmp_path / "two", tmp_path / "one")
    again = _train("--resume", str(state))  # the saved settings: 2 processes again
    assert again.returncode == 0, again.stdout
    assert f"step {stopped_at + 1}/6" in again.stdout and "step 6/6" in again.stdout

    # the same state on one process: batch 1 becomes 2 (2 images per step, as stopped)
    copy = TrainConfig.load(tmp_path / "one" / "ddp-state" / "config.json")
    alone = run_training(dataclasses.replace(copy, output_dir=str(tmp_path / "one"), processes=1,
                                             resume=str(tmp_path / "one" / "ddp-state"), overwrite=True))
    single = _single(dataclasses.replace(config, output_dir=str(tmp_path / "ref"), batch_size=2))
    assert alone.steps == single.steps == 6
    _assert_same_lora(tmp_path / "two" / "ddp.safetensors", single.lora_path)
    _assert_same_lora(alone.lora_path, single.lora_path)
    assert alone.losses == pytest.approx(single.losses, rel=1e-4, abs=1e-4)


_CRASH = """
import os
if os.environ.get("RANK") == "1":
    from lora_trainer.train import engine
    step = engine._Run._step
    def failing_step(self, ctx, chunk, runner, *more):
        if self.pos.step == 1:  # the second step
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return step(self, ctx, chunk, runner, *more)
    engine._Run._step = failing_step
"""


def test_one_failing_process_ends_the_run_with_one_message(tmp_path, tiny_sd1_ckpt, two_buckets):
    """Rank 1 runs out of memory at its second step (simulated: no allocator fails on cue; the failure is
    injected through sitecustomize in that process only): rank 0 notices, the launcher prints one line
    naming the cause and exits 2; what was saved is whole (step 1), nothing after it, no temporary file."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASH, encoding="utf-8")
    config = _config(tiny_sd1_ckpt, two_buckets, tmp_path / "out", save_every_n_steps=1)
    run = _train("--config", _settings(config, tmp_path / "s.json"), "--processes", "2",
                 env=_env(PYTHONPATH=str(hooks)))
    assert run.returncode == 2, run.stdout
    errors = [line for line in run.stdout.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith(
        "error: process 1 of 2 failed: Training on cpu ran out of memory at step 1"), run.stdout
    assert "Traceback" not in run.stdout
    from lora_trainer.train.outputs import CLAIMS_DIR  # the run's name claims (locks), kept by design

    out = tmp_path / "out"
    names = sorted(p.name for p in out.rglob("*") if p.is_file() and CLAIMS_DIR not in p.relative_to(out).parts)
    assert names == ["config.json", "ddp-step00000001.safetensors", "state.safetensors"], names


@requires_flux_diffusers
def test_flux_with_block_swap_on_two_processes(tmp_path, two_buckets):
    """Flux.1 under DDP with block swap (frozen block weights streamed through slots, LoRA weights on the
    device): 2 processes x batch 1 train the LoRA of one process x batch 2."""
    from lora_trainer.models.flux.tiny import write_tiny_flux_checkpoint

    ckpt = write_tiny_flux_checkpoint(tmp_path / "flux", "dev", seed=0)  # with clip_l, t5xxl and ae beside it
    config = _config(ckpt, two_buckets, tmp_path / "two", resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                     t5_max_token_length=32, epochs=0, max_steps=3, flip_aug=False,
                     gradient_accumulation_steps=1, blocks_to_swap=2)
    run = _run([sys.executable, "-m", "lora_trainer", "-v", "train", "--config", _settings(config, tmp_path / "s.json"),
                "--processes", "2"])
    assert run.returncode == 0, run.stdout
    assert run.stdout.count("block swap (single blocks): 2 of 2 blocks") == 2  # each rank swaps its own copy
    single = _single(dataclasses.replace(config, output_dir=str(tmp_path / "one"), batch_size=2))
    _assert_same_lora(tmp_path / "two" / "ddp.safetensors", single.lora_path)
    assert _losses(run.stdout) == pytest.approx(single.losses, rel=1e-4, abs=1e-4)
