"""AdamW with 8-bit optimizer states, in plain torch: the `AdamW8bit` choice where bitsandbytes does not
import (no CUDA build for this platform, a CPU-only install, a GPU machine without it).

Both moments live as flat block-quantised buffers (256 values per block, one fp32 scale per block; one
buffer per chunk of up to 16 M values, which bounds the step's temporaries): the first moment as a signed 8-bit code of sign·sqrt(|m|/absmax) (companding keeps
small values, as bitsandbytes' dynamic map does), the second as an unsigned 8-bit code of
(v/absmax)^(1/4). That is 2 bytes per parameter instead of AdamW's 8 (Flux rank-16 LoRA: 150 MB
instead of 610 MB). Each step dequantises, updates and requantises each chunk in a few large kernels (no
per-parameter loop), with the learning rate and step count as device tensors, so the step
is capturable in a CUDA graph (accel.StepRunner treats it like a capturable torch AdamW).
"""

from __future__ import annotations

import torch

BLOCK = 256


class AdamW8bit(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (torch.optim.AdamW's math) over 8-bit block-quantised moments."""

    capturable_in_graphs = True  # accel.StepRunner may capture its step

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("invalid AdamW8bit hyper-parameters")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    # ------------------------------------------------------------------ state
    def _group_state(self, group: dict) -> dict:
        """The group's state, kept under its first parameter: the step count and, per chunk of at most
        CHUNK values (whole parameters), the quantised moments and their block scales."""
        params = group["params"]
        state = self.state[params[0]]
        if "step" not in state:
            device = params[0].device
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            for c, chunk in enumerate(_chunks(params)):
                n = sum(p.numel() for p in chunk)
                padded = (n + BLOCK - 1) // BLOCK * BLOCK
                state[f"m_code{c}"] = torch.zeros(padded, dtype=torch.int8, device=device)
                state[f"m_scale{c}"] = torch.zeros(padded // BLOCK, dtype=torch.float32, device=device)
                state[f"v_code{c}"] = torch.zeros(padded, dtype=torch.uint8, device=device)
                state[f"v_scale{c}"] = torch.zeros(padded // BLOCK, dtype=torch.float32, device=device)
        return state

    @staticmethod
    def _flat(tensors: list[torch.Tensor], padded: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, padded - flat.numel()))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = list(group["params"])
            if not any(p.grad is not None for p in params):
                continue
            state = self._group_state(group)
            b1, b2 = group["betas"]
            lr = group["lr"]
            lr = lr.to(params[0].device, torch.float32) if isinstance(lr, torch.Tensor) else torch.tensor(
                float(lr), device=params[0].device)
            state["step"] += 1
            step = state["step"]
            bc1 = 1 - b1 ** step
            bc2 = 1 - b2 ** step
            for c, chunk in enumerate(_chunks(params)):
                codes = (state[f"m_code{c}"], state[f"m_scale{c}"], state[f"v_code{c}"], state[f"v_scale{c}"])
                self._update(chunk, codes, group, lr, bc1, bc2)
        return loss

    def _update(self, params: list[torch.Tensor], codes, group: dict, lr, bc1, bc2) -> None:
        m_code, m_scale, v_code, v_scale = codes
        padded = m_code.numel()
        b1, b2 = group["betas"]
        g = self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], padded)
        w = self._flat(params, padded)
        m = _dequant_signed(m_code, m_scale)
        v = _dequant_quartic(v_code, v_scale)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        del g
        w.mul_(1 - lr * group["weight_decay"])
        denom = (v / bc2).sqrt_().add_(group["eps"])
        w.sub_(lr * (m / bc1) / denom)
        del denom
        _quant_signed(m, m_code, m_scale)
        _quant_quartic(v, v_code, v_scale)
        new = w[: sum(p.numel() for p in params)].split([p.numel() for p in params])
        torch._foreach_copy_(params, [t.view_as(p).to(p.dtype) for t, p in zip(new, params)])


CHUNK = 1 << 24  # values updated at once: bounds the step's fp32 temporaries (~6 x 64 MB)


def _chunks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    chunks: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if chunks[-1] and size + p.numel() > CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, BLOCK)


def _quant_signed(x: torch.Tensor, code: torch.Tensor, scale: torch.Tensor) -> None:
    b = _blocks(x)
    amax = b.abs().amax(dim=1).clamp_(min=1e-30)
    scale.copy_(amax)
    q = (b.abs() / amax[:, None]).sqrt_().mul_(127).round_().mul_(b.sign())
    code.copy_(q.reshape(-1).to(torch.int8))


def _dequant_signed(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = _blocks(code.float()) / 127
    return (q.abs() * q * scale[:, None]).reshape(-1)


def _quant_quartic(x: torch.Tensor, code: torch.Tensor, scale: torch.Tensor) -> None:
    b = _blocks(x)
    amax = b.amax(dim=1).clamp_(min=1e-30)
    scale.copy_(amax)
    q = (b / amax[:, None]).clamp_(min=0).pow_(0.25).mul_(255).round_()
    code.copy_(q.reshape(-1).to(torch.uint8))


def _dequant_quartic(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = _blocks(code.float()) / 255
    return (q.pow(4) * scale[:, None]).reshape(-1)
