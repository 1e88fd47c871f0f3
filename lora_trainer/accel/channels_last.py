"""channels_last end to end for diffusers' UNets (accel's `channels_last`).

The model's 4-D weights go NHWC, so cuDNN's convolutions take and give NHWC activations without the transposes it
adds around NCHW ones (7 of SD1.5 batch 8's 85 ms a step on an H100, bench/results/speed_lean_h100.md). Two places
still made NCHW copies: torch's GroupNorm (accel/group_norm_nhwc.py replaces it) and diffusers' Transformer2DModel,
whose output ends in `.permute(0, 3, 1, 2).contiguous()`: an NCHW copy of a tensor that is NHWC rows already, then a
mixed-layout add to the residual and a transpose back before the next convolution. Here that method runs without
the `.contiguous()` where the residual is channels_last (the same values; diffusers 0.29 to 0.42 share it).

Each ResnetBlock2D (SD's "default" time embedding, SiLU) runs diffusers' forward with its two GroupNorm + SiLU
pairs as one NHWC pass each way (accel.norms.group_norm_silu: SiLU's input is neither written nor kept), without
the newest diffusers' `.contiguous()` before the shortcut convolution (an NCHW copy for DDP's sake) and without its
division by an output scale of 1.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .forwards import replace_forwards, restore_forwards
from .group_norm_nhwc import is_nhwc
from .norms import group_norm_silu, keeps_nhwc

_ATTR = "_lora_trainer_nhwc_output"
_RESNET_ATTR = "_lora_trainer_fused_resnet"
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


def _resnet_forward(self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: Any,
                    **kwargs: Any) -> torch.Tensor:
    """diffusers' ResnetBlock2D.forward for its "default" time embedding and SiLU, with fused norm + SiLU passes."""
    hidden_states = None if args or kwargs else group_norm_silu(self.norm1, input_tensor)
    if hidden_states is None:  # not NHWC, not under CUDA autocast, or called another way: diffusers' own
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers' own guard (its issue 984)
            input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
        input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None:
        hidden_states = hidden_states + temb
    fused = group_norm_silu(self.norm2, hidden_states)
    hidden_states = fused if fused is not None else self.nonlinearity(self.norm2(hidden_states))
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    output = input_tensor + hidden_states
    return output if self.output_scale_factor == 1 else output / self.output_scale_factor


def _resnet_forward_for(m: nn.Module) -> Any:
    """The fused forward for a diffusers ResnetBlock2D whose norms are NHWC-marked (accel.norms) and whose
    activation is SiLU with the "default" time embedding (SD1, SD2, SDXL); None for anything else."""
    if type(m).__name__ != "ResnetBlock2D" or getattr(m, "time_embedding_norm", None) != "default":
        return None
    if type(getattr(m, "nonlinearity", None)) is not nn.SiLU:
        return None
    if not all(keeps_nhwc(getattr(m, name, None)) for name in ("norm1", "norm2")):
        return None
    return _resnet_forward


def use_channels_last(model: nn.Module) -> dict[str, int]:
    """`model`'s 4-D weights channels_last, its diffusers Transformer2DModels' output kept so, and its ResnetBlock2Ds
    with NHWC norms (accel.norms.lowp_norms(nhwc=True) first) on fused norm + SiLU passes; returns how many."""
    model.to(memory_format=torch.channels_last)
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Transformer2DModel" and callable(getattr(type(m), _METHOD, None)):
            setattr(m, _METHOD, types.MethodType(_output_nhwc, m))
            setattr(m, _ATTR, True)
            n += 1
    return {"nhwc_block_outputs": n, "fused_resnets": replace_forwards(model, _resnet_forward_for, _RESNET_ATTR)}


def restore_block_outputs(model: nn.Module) -> int:
    """Undo `use_channels_last`'s method swaps (the weights' layout stays); returns how many."""
    n = restore_forwards(model, _RESNET_ATTR)
    for m in model.modules():
        if m.__dict__.pop(_ATTR, False):
            m.__dict__.pop(_METHOD, None)
            n += 1
    return n
