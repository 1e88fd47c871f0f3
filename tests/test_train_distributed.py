"""Data-parallel training pieces (train/distributed.py) that need no second process: how a global batch
is sliced across ranks, resuming onto another number of processes, refusing several GPUs where only
one process trains. The multi-process runs themselves are in test_train_ddp_processes.py."""

from __future__ import annotations

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
    get them instead of silently using one."""
    from lora_trainer.train.distributed import SINGLE, check_processes

    with pytest.raises(ConfigError, match="--gpus 4"):
        check_processes(TrainConfig(processes=4), SINGLE, hosted=True)
    check_processes(TrainConfig(processes=1), SINGLE, hosted=True)
