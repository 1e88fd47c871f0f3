"""Prediction-type detection for files without a yaml (A1111's rules)."""

from __future__ import annotations

import torch

from lora_trainer.models import Family
from lora_trainer.models.detect import TensorInfo, prediction_hint
from lora_trainer.models.loader import _sd2_is_v_prediction
from lora_trainer.models.tiny import build_tiny_bundle


def test_v_pred_key_marks_sdxl_v_prediction():
    tensors = {"v_pred": TensorInfo((), "F32"), "model.diffusion_model.out.2.weight": TensorInfo((4, 4), "F16")}
    assert prediction_hint(tensors, Family.SDXL) == "v_prediction"
    assert prediction_hint({}, Family.SDXL) is None
    assert prediction_hint({}, Family.SD2) is None  # decided by running the UNet
    assert prediction_hint({}, Family.SD1) == "epsilon"


def test_sd2_v_prediction_probe_reads_the_unet_output():
    """A1111 calls an SD2 file v-prediction when the UNet output at t=999 lies far below the input."""
    unet = build_tiny_bundle("sd2").unet
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-5.0)
        assert _sd2_is_v_prediction(unet)
        unet.conv_out.bias.fill_(0.0)
        assert not _sd2_is_v_prediction(unet)
