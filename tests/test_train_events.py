"""RunClock: speed over a recent window (not the slow first step), ETA with the sampling and saving to come."""

from __future__ import annotations

import pytest

from lora_trainer.train.events import RunClock, Schedule


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_speed_leaves_out_the_first_step_and_side_work():
    now = FakeTime()
    clock = RunClock(Schedule(total_steps=100, epochs=1, steps_per_epoch=100), window=5, now=now)
    now.t += 30.0  # step 1: warm-up (graph capture, autotuning)
    clock.step(1)
    assert clock.rate() is None and clock.eta(1) is None  # no honest number yet
    for step in range(2, 12):
        now.t += 0.1
        clock.step(step)
        if step == 6:
            with clock.phase("save"):
                now.t += 5.0  # a save between steps is not training time
    assert clock.rate() == pytest.approx(10.0)  # averaging from the start would say ~0.3 it/s
    assert clock.eta(11) == pytest.approx(89 / 10 + 5.0)  # the final save, timed by the last one


def test_the_slow_steps_after_the_first_are_left_out_of_the_speed():
    """Measured on an H200 (SD1.5, batch 1): step 1 ends 10 s after the start, steps 2 and 3 take 0.15 and 0.23 s
    (the CUDA graph is captured at step 3), then 0.03 s each; the window then read 10-14 it/s for the first twenty
    steps where the run trained at 33 it/s."""
    now = FakeTime()
    clock = RunClock(Schedule(total_steps=400, epochs=1, steps_per_epoch=400), window=20, now=now)
    for step, seconds in enumerate([10.0, 0.15, 0.23] + [0.03] * 7, start=1):
        now.t += seconds
        clock.step(step)
    assert clock.rate() == pytest.approx(1 / 0.03)
    assert clock.eta(10) == pytest.approx(390 * 0.03)


def test_steps_of_uneven_length_all_count():
    """Buckets of different sizes make steps of different length: within a few times the median, every step is
    part of the speed."""
    now = FakeTime()
    clock = RunClock(Schedule(total_steps=100, epochs=1, steps_per_epoch=100), window=20, now=now)
    clock.step(1)
    for step in range(2, 22):
        now.t += 0.1 if step % 2 else 0.3
        clock.step(step)
    assert clock.rate() == pytest.approx(20 / 4.0)


def test_window_follows_a_speed_change():
    now = FakeTime()
    clock = RunClock(Schedule(total_steps=1000, epochs=1, steps_per_epoch=1000), window=10, now=now)
    for step in range(1, 50):
        now.t += 1.0 if step < 30 else 0.25
        clock.step(step)
    assert clock.rate() == pytest.approx(4.0)


def test_eta_counts_sampling_rounds_still_to_come():
    sched = Schedule(total_steps=100, epochs=10, steps_per_epoch=10, batch_size=1, sample_every_n_epochs=2,
                     sample_images=2, sample_steps=15, save_every_n_epochs=3)
    assert sched.samples_after(0) == 5 and sched.samples_after(40) == 3 and sched.samples_after(100) == 0
    assert sched.saves_after(0) == 1 + 3  # epochs 3, 6, 9 + the final file
    assert sched.saves_after(65) == 1 + 1
    now = FakeTime()
    clock = RunClock(sched, now=now)
    for step in range(1, 4):
        now.t += 0.5
        clock.step(step)
    # before any sampling ran: 2 images x 15 steps, a CFG step ~ 2/3 of a batch-1 training step
    assert clock.eta(3) == pytest.approx(97 * 0.5 + 5 * (2 * 15 * 2 / 3 * 0.5))
    with clock.phase("sample"):
        now.t += 12.0
    assert clock.eta(3) == pytest.approx(97 * 0.5 + 5 * 12.0)


def test_max_steps_cuts_the_epochs_that_sample():
    sched = Schedule(total_steps=25, epochs=10, steps_per_epoch=10, sample_every_n_epochs=1, sample_images=1,
                     sample_steps=10)
    assert sched.samples_after(0) == 3  # epochs 1, 2 and the cut-short 3rd


def test_diffusers_empty_fp32_list_warning_is_not_printed():
    """diffusers 0.42 warns "should be kept in float32: []" on every `.to(dtype)`; a run must not print it."""
    import logging

    import torch

    from lora_trainer import quiet
    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.quiet import quiet_known_warnings

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        quiet_known_warnings()
        quiet_known_warnings()  # idempotent
        build_tiny_bundle("sd1").vae.to(dtype=torch.bfloat16)
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in X that should be kept in float32: ['norm']. Casting ...")  # a real list passes
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not any("float32: []" in m for m in messages)
    assert any("float32: ['norm']" in m for m in messages)
    ours = [f for f in logging.getLogger("diffusers.models.modeling_utils").filters if type(f).__module__ == quiet.__name__]
    assert len(ours) == 1
