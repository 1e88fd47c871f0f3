"""The CLI's `train` keeps bitsandbytes out of sight of diffusers and peft (hidden_imports.py) when its
optimizer does not use it; our own code still imports it where a run needs it. Each check runs in a fresh
process: hiding is process-wide (and `cli.main(argv)` from a caller, as in these tests, never hides)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_trainer.hidden_imports import BITSANDBYTES_OPTIMIZERS, hide_bitsandbytes

ROOT = Path(__file__).resolve().parent.parent
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_optimizers_that_use_it_and_an_imported_package_are_left_alone():
    assert {"AdamW8bit", "Lion8bit", "Lion"} <= BITSANDBYTES_OPTIMIZERS
    assert all(not hide_bitsandbytes(name) for name in BITSANDBYTES_OPTIMIZERS)
    assert "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert _python("""
            import sys, bitsandbytes
            from lora_trainer.hidden_imports import hide_bitsandbytes
            print(hide_bitsandbytes("AdamW"), sys.modules["bitsandbytes"] is bitsandbytes)
        """) == "False True"  # already imported (a host's): left alone


@needs_bnb
def test_hidden_from_diffusers_and_peft_then_ours_imports_it():
    out = _python("""
        import sys, importlib.util, torch
        from lora_trainer.hidden_imports import hide_bitsandbytes, is_hidden
        assert hide_bitsandbytes("AdamW") and is_hidden()
        assert importlib.util.find_spec("bitsandbytes") is None  # how the libraries check
        from lora_trainer.models.tiny import build_tiny_bundle
        from lora_trainer.lora import LoraSpec, inject_lora
        from lora_trainer.train.optim import build_optimizer
        net = inject_lora(build_tiny_bundle("sd1"), LoraSpec(rank=4, alpha=4), seed=0)
        untouched = sys.modules["bitsandbytes"] is None
        opt = build_optimizer("AdamW8bit", [{"params": list(net.parameters())}], lr=1e-3, weight_decay=0.0)
        from lora_trainer.quant.formats import Nf4Weight
        w = Nf4Weight.quantize(torch.randn(8, 64))
        print(untouched, type(opt).__module__.split(".")[0], not is_hidden(), w.dequantize(torch.float32, "cpu").shape)
    """)
    assert out == "True bitsandbytes True torch.Size([8, 64])"


@needs_bnb
def test_cli_train_run_never_imports_it(tmp_path):
    from train_support import make_dataset

    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path, "sd1")
    data = make_dataset(tmp_path / "d", n=2)
    out = _python(f"""
        import runpy, sys
        sys.argv = ["lora_trainer", "train", "--model", {str(ckpt)!r}, "--data", {str(data)!r}, "--out",
                    {str(tmp_path / "o")!r}, "--name", "h", "--resolution", "64", "--rank", "4", "--device", "cpu",
                    "--max-steps", "1", "--min-bucket-reso", "32", "--max-bucket-reso", "128"]
        from lora_trainer.cli import main
        rc = main()
        print(rc, repr(sys.modules.get("bitsandbytes", "absent")))
    """)
    assert out == "0 None"
    assert (tmp_path / "o" / "h.safetensors").is_file()
