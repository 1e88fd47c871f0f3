"""Whether bitsandbytes' 4-bit functions run here (shared by the tests that quantise to nf4)."""

from __future__ import annotations

import torch


def _bnb_ok() -> bool:
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        q, s = quantize_4bit(torch.ones(64, 64), blocksize=64, quant_type="nf4")
        return bool(torch.allclose(dequantize_4bit(q, s), torch.ones(64, 64)))
    except Exception:  # noqa: BLE001 - not installed, or no 4-bit backend for this machine
        return False


HAS_BNB = _bnb_ok()
