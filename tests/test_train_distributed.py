"""Data-parallel training pieces (train/distributed.py) that need no second process: how a global batch
is sliced across ranks, resuming onto another number of processes, refusing several GPUs where only
one process trains. The multi-process runs themselves are in test_train_ddp_processes.py."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError


class _Ranks:
    """A DataParallel seen from one rank, without a process group (only `take` is used)."""

    @staticmethod
    def of(rank: int, world: int):
        from lora_trainer.train.distributed import DataParallel

        return DataParallel(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"), backend="gloo",
                            control=None)


@pytest.mark.parametrize("n, world", [(4, 2), (3, 2), (1, 2), (5, 4), (8, 8), (2, 3)])
def test_slices_cover_the_global_batch_with_the_single_process_weights(n, world):
    """Each rank gets ceil(n/world) samples; the DDP average of the ranks' weighted means equals the
    mean over the n samples (padding weighs 0), whatever the tail."""
    batch = {"latents": torch.arange(n * 2, dtype=torch.float32).reshape(n, 2), "weights": torch.full((n,), 0.5),
             "scale": torch.tensor(1.0), "shared": torch.ones(1, 3)}
    loss_per_sample = torch.arange(1, n + 1, dtype=torch.float64)
    expected = (loss_per_sample * 0.5).mean()
    total, seen = torch.zeros((), dtype=torch.float64), []
    for rank in range(world):
        part = _Ranks.of(rank, world).take(batch)
        per = -(-n // world)
        assert part["latents"].shape == (per, 2) and part["weights"].shape == (per,)
        assert part["scale"] is batch["scale"] and part["shared"] is batch["shared"]
        rows = [int(r[0].item()) // 2 for r in part["latents"]]
        real = [r for r, w in zip(rows, part["weights"]) if w > 0]
        seen += real
        total += (loss_per_sample[rows] * part["weights"].double()).mean()
    assert sorted(seen) == list(range(n))
    assert float(total / world) == pytest.approx(float(expected))


def test_resume_keeps_the_images_per_step(tmp_path):
    from lora_trainer.train.distributed import match_resume

    state = tmp_path / "x-state"
    state.mkdir()
    (state / "config.json").write_text(json.dumps({"batch_size": 4, "processes": 2}), encoding="utf-8")
    one = match_resume(TrainConfig(resume=str(state), batch_size=4, processes=1))
    assert one.batch_size == 8 and one.global_batch_size == 8
    four = match_resume(TrainConfig(resume=str(state), batch_size=4, processes=4))
    assert four.batch_size == 2
    same = TrainConfig(resume=str(state), batch_size=4, processes=2)
    assert match_resume(same) is same
    with pytest.raises(ConfigError, match="8 images per step"):
        match_resume(TrainConfig(resume=str(state), batch_size=3, processes=1))
    with pytest.raises(ConfigError, match="8 images per step"):
        match_resume(TrainConfig(resume=str(state), batch_size=4, processes=3))
    # the hash that guards a resume counts images per step, so 2 x 4 and 1 x 8 resume each other
    assert TrainConfig(batch_size=4, processes=2).hash() == TrainConfig(batch_size=8).hash()
    assert TrainConfig(batch_size=4, processes=2).hash() != TrainConfig(batch_size=4).hash()


def test_a_webui_or_server_run_refuses_several_gpus(tmp_path):
    """Inside a WebUI (or `serve`/`ui`) a run is one process on one GPU: asking for more says how to
    get them instead of silently using one. The engine refuses (a settings file loaded by any caller),
    and a request does at once: the real API route answers 400 before a job is queued (the WebUI tab's
    form goes through the same request check)."""
    from lora_trainer.train.distributed import SINGLE, check_processes

    with pytest.raises(ConfigError, match="--gpus 4"):
        check_processes(TrainConfig(processes=4), SINGLE, hosted=True)
    check_processes(TrainConfig(processes=1), SINGLE, hosted=True)

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from lora_trainer.api import create_app
    from lora_trainer.host import StandaloneHost
    from lora_trainer.jobs import JobManager

    (tmp_path / "ds").mkdir()
    host = StandaloneHost(tmp_path / "Lora", allowed_roots=[tmp_path])
    jobs = JobManager(host, work_dir=tmp_path / "runs")
    try:
        client = TestClient(create_app(host, jobs))
        r = client.post("/lora-trainer/v1/train", json={"data": str(tmp_path / "ds"), "name": "x", "processes": 2})
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("Training here runs in one process on one GPU, and these settings "
                                             "ask for 2 (processes); set processes to 1 to train here")
        assert "python -m lora_trainer train --gpus 2" in r.json()["detail"]
        assert jobs.jobs() == []
    finally:
        jobs.shutdown()


# ---------------------------------------------------------------------- the launcher's side
_FILES = itertools.count()


def _failure(tmp_path, rank: int, exitcode: int, record: dict | None = None):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / f"error-{rank}-{next(_FILES)}.json"
    if record is not None:
        data = {"message": record["message"], "timestamp": 1, "lora_trainer": {**record, "time": rank}}
        path.write_text(json.dumps(data), encoding="utf-8")
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def _report(tmp_path, capsys, failures: dict) -> tuple[int, str]:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from lora_trainer.launch import _report_failure

    code = _report_failure(ChildFailedError("lora_trainer", failures), len(failures))
    return code, capsys.readouterr().err


def test_launcher_names_the_first_failure_in_one_line(tmp_path, capsys):
    """What torch elastic hands the launcher (its real ChildFailedError/ProcessFailure, reading the error
    files the workers write) becomes one line: the failing process and its message; peers that failed
    because of it, and processes the launcher stopped, are not reported."""
    oom = "Training on cuda ran out of memory at step 3 (resolution 1024, batch 8); lower the batch size."
    code, err = _report(tmp_path, capsys, {
        0: _failure(tmp_path, 0, 3, {"kind": "peer", "message": "another process of the run failed"}),
        1: _failure(tmp_path, 1, 2, {"kind": "error", "message": oom})})
    assert code == 2 and err == f"error: process 1 of 2 failed: {oom}\n"
    # the same error on every rank (bad settings): just the message
    bad = "Settings file x.toml cannot be parsed; fix its syntax."
    code, err = _report(tmp_path, capsys, {r: _failure(tmp_path, r, 2, {"kind": "error", "message": bad})
                                           for r in (0, 1)})
    assert code == 2 and err == f"error: {bad}\n"
    # killed without a word (the kernel's OOM killer): the signal, and what usually sends it
    code, err = _report(tmp_path, capsys, {
        0: _failure(tmp_path, 0, 3, {"kind": "peer", "message": "another process of the run failed"}),
        1: _failure(tmp_path, 1, -9)})
    assert code == 2 and err.startswith("error: process 1 of 2 was killed by SIGKILL (often the system running out")
    assert err.count("\n") == 1
    # every process stopped by a signal sent to it (not to the launcher): a stop, not a failure
    code, err = _report(tmp_path, capsys, {r: _failure(tmp_path, r, 143) for r in (0, 1)})
    assert code == 143 and err == ""


def test_gpus_and_processes_options(tmp_path, capsys):
    from lora_trainer.cli import main

    rc = main(["train", "--data", str(tmp_path), "--gpus", "2", "--device", "cpu"])
    assert rc == 2 and "use --processes 2 --device cpu" in capsys.readouterr().err
    rc = main(["train", "--data", str(tmp_path), "--gpus", "two"])
    assert rc == 2 and "--gpus takes a number of GPUs or 'all'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(["train", "--data", str(tmp_path), "--gpus", "all"])
        assert rc == 2 and "found no GPU" in capsys.readouterr().err
        rc = main(["train", "--data", str(tmp_path), "--gpus", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and "--gpus 2 found no GPU" in err and "--processes 2 --device cpu" in err
    from train_support import make_dataset

    data = make_dataset(tmp_path / "d", n=3, repeats=2)
    rc = main(["train", "--data", str(data), "--processes", "2", "--batch-size", "2", "--resolution", "64",
               "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "6 samples / batch 4 = 2 batches per epoch" in out  # the plan counts both processes
