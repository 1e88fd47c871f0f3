"""`python -m lora_trainer train`: exit codes, one-line errors, plan and progress output."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from train_support import make_dataset, tiny_data, tiny_sd1_ckpt  # noqa: F401

from lora_trainer.cli import main


def _args(ckpt, data, out, *extra):
    return ["train", "--model", str(ckpt), "--data", str(data), "--name", "cli", "--out", str(out),
            "--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32",
            "--rank", "4", "--device", "cpu", *extra]


def test_train_from_checkpoint_prints_plan_and_progress(tmp_path, tiny_sd1_ckpt, tiny_data, capsys):
    rc = main(_args(tiny_sd1_ckpt, tiny_data, tmp_path / "o", "--max-steps", "3", "--lr", "1e-3",
                    "--alpha", "2", "--seed", "3", "--mixed-precision", "no", "--save-config",
                    str(tmp_path / "used.toml")))
    out = capsys.readouterr().out
    assert rc == 0
    assert "3 images × repeats = 6 samples per epoch" in out and "→ 3 steps" in out
    assert "step 1/3" in out and "step 3/3" in out and "loss" in out
    assert (tmp_path / "o" / "cli.safetensors").is_file() and (tmp_path / "o" / "cli.json").is_file()
    assert 'alpha = 2.0' in (tmp_path / "used.toml").read_text(encoding="utf-8")


def test_dry_run_and_config_file(tmp_path, tiny_sd1_ckpt, tiny_data, capsys):
    settings = tmp_path / "s.json"
    settings.write_text('{"batch_size": 2, "epochs": 5}', encoding="utf-8")
    rc = main(_args(tiny_sd1_ckpt, tiny_data, tmp_path / "o", "--config", str(settings), "--dry-run"))
    assert rc == 0
    assert "6 samples / batch 2 = 3 batches per epoch" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "rank must be at least 1"),
    (["--lr", "0"], "learning_rate must be greater than 0"),
    (["--lr", "-0.1"], "learning_rate must be greater than 0"),
    (["--max-steps", "0"], "zero steps"),
    (["--name", "../up"], "path separator or '..'"),
    (["--optimizer", "Prodigy"], "pip install prodigyopt"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_sd1_ckpt, tiny_data, capsys, extra, message):
    if "Prodigy" in extra:
        pytest.importorskip("importlib").util.find_spec("prodigyopt") and pytest.skip("prodigyopt installed")
    argv = _args(tiny_sd1_ckpt, tiny_data, tmp_path / "o", "--max-steps", "2")
    argv += extra
    if "--max-steps" in extra:
        argv = _args(tiny_sd1_ckpt, tiny_data, tmp_path / "o", *extra)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_bad_paths_exit_2(tmp_path, tiny_sd1_ckpt, tiny_data, capsys):
    assert main(_args(tmp_path / "missing.safetensors", tiny_data, tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "img").mkdir(parents=True)
    assert main(_args(tiny_sd1_ckpt, empty, tmp_path / "o")) == 2
    assert "holds no images" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "img" / "noprefix").mkdir(parents=True)
    (bad / "img" / "noprefix" / "a.png").write_bytes(b"x")
    assert main(_args(tiny_sd1_ckpt, bad, tmp_path / "o")) == 2
    assert "no <repeats>_ prefix" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path, tiny_data):
    """The real `python -m lora_trainer` process: exit status 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--model", str(tmp_path / "nope.ckpt"),
                           "--data", str(tiny_data), "--name", "x", "--out", str(tmp_path / "o")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_stop_file_then_resume_from_state_folder_alone(tmp_path, tiny_data, capsys):
    """`train --resume OUT/name-state` continues with the settings saved in the state folder."""
    from lora_trainer.config import TrainConfig
    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.train import run_training

    config = TrainConfig(data=str(tiny_data), output_dir=str(tmp_path / "o"), name="cli", resolution=64,
                         min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, rank=4, epochs=1,
                         device="cpu", model=str(tmp_path / "unused.safetensors"))
    stop = threading.Event()
    stop.set()
    first = run_training(config, bundle=build_tiny_bundle("sd1"), stop=stop)
    assert first.stopped and (first.state_dir / "config.json").is_file()
    # The saved settings name a model file; give the run a real one (same tiny weights).
    from lora_trainer.models.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "sd1", name="unused")
    assert main(["train", "--resume", str(first.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and (tmp_path / "o" / "cli.safetensors").is_file()
