"""accel's Triton kernel checks asked early, in a thread (accel/triton_check.py `check_early`, accel/prepare.py
`check_kernels_early`): a later ask of the same kind waits for that check's answer instead of running a second one.
Real threads; the check function is a stand-in where the point is the once-only (the GPU test runs the real ones)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lora_trainer.accel import AccelOptions, check_kernels_early
from lora_trainer.accel.triton_check import check_early, checked_once


def test_a_check_in_flight_on_another_thread_is_the_one_a_later_ask_gets():
    results: dict = {}
    ran, entered = [], threading.Event()

    def slow_check(device):
        ran.append(threading.current_thread().name)
        entered.set()
        time.sleep(0.3)  # the later ask below comes while this runs
        return True

    def ask():
        return checked_once(results, "cpu", ("kind",), "The test's", slow_check)

    early = check_early([ask])
    assert entered.wait(timeout=30)
    assert ask() is True  # waits for the thread's check, does not run its own
    assert early.result(timeout=30) == [True]
    assert len(ran) == 1 and ran[0].startswith("triton-check")


def test_a_failing_early_check_says_no_once():
    results: dict = {}
    calls = []

    def broken(device):
        calls.append(1)
        raise RuntimeError("no kernels here")

    early = check_early([lambda: checked_once(results, "cpu", ("kind",), "The test's", broken)])
    assert early.result(timeout=30) == [False]
    assert checked_once(results, "cpu", ("kind",), "The test's", broken) is False and calls == [1]


def test_no_early_checks_off_by_default_on_the_cpu_or_without_accel():
    assert AccelOptions().early_kernel_check is False
    assert check_kernels_early(AccelOptions(), "cuda", torch.bfloat16) is None
    assert check_kernels_early(AccelOptions(early_kernel_check=True), "cpu", torch.float32) is None
    assert check_kernels_early(AccelOptions(enabled=False, early_kernel_check=True), "cuda", torch.bfloat16) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels' own checks run on CUDA only")
def test_on_a_gpu_the_early_checks_are_the_ones_prepare_model_uses():
    from lora_trainer.accel import geglu, group_norm_nhwc
    from lora_trainer.accel.fused_math import fused_math_available

    if not fused_math_available("cuda"):
        pytest.skip("no usable Triton on this GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    geglu._checked.clear()
    group_norm_nhwc._checked.clear()
    early = check_kernels_early(AccelOptions(early_kernel_check=True), "cuda", torch.bfloat16)
    assert early is not None and early.result(timeout=300) == [True, True]
    assert (device, torch.bfloat16) in group_norm_nhwc._checked
    assert (device, torch.bfloat16, geglu.APPROXIMATE) in geglu._checked
    assert geglu.check_kernels("cuda", torch.bfloat16) is True  # answered from the early check
