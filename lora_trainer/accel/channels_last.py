"""channels_last end to end for diffusers' UNets (accel's `channels_last`).

The model's 4-D weights go NHWC, so cuDNN's convolutions take and give NHWC activations without the transposes it
adds around NCHW ones (7 of SD1.5 batch 8's 85 ms a step on an H100, bench/results/speed_lean_h100.md). Two places
still made NCHW copies: torch's GroupNorm (accel/group_norm_nhwc.py replaces it) and diffusers' Transformer2DModel,
whose output ends in `.permute(0, 3, 1, 2).contiguous()`: an NCHW copy of a tensor that is NHWC rows already, then a
mixed-layout add to the residual and a transpose back before the next convolution. Here that method runs without
the `.contiguous()` where the residual is channels_last (the same values; diffusers 0.29 to 0.42 share it).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .group_norm_nhwc import is_nhwc

_ATTR = "_lora_trainer_nhwc_output"
_METHOD = "_get_output_for_continuous_inputs"


def _output_nhwc(self: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int,
                 height: int, width: int, inner_dim: int) -> torch.Tensor:
    """diffusers' Transformer2DModel output (proj_out, back to (N, C, H, W), plus the residual) as a channels_last
    view of its (N·H·W, C) rows instead of an NCHW copy."""
    if not is_nhwc(residual):
        return getattr(type(self), _METHOD)(self, hidden_states, residual, batch_size, height, width, inner_dim)
    if not self.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(hidden_states)
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def use_channels_last(model: nn.Module) -> int:
    """`model`'s 4-D weights channels_last, and its diffusers Transformer2DModels' output kept so; returns how many
    of those."""
    model.to(memory_format=torch.channels_last)
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Transformer2DModel" and callable(getattr(type(m), _METHOD, None)):
            setattr(m, _METHOD, types.MethodType(_output_nhwc, m))
            setattr(m, _ATTR, True)
            n += 1
    return n


def restore_block_outputs(model: nn.Module) -> int:
    """Undo `use_channels_last`'s method swap (the weights' layout stays); returns how many."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_ATTR, False):
            m.__dict__.pop(_METHOD, None)
            n += 1
    return n
