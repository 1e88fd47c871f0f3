"""What a user reads from a real `python -m lora_trainer` process: no internal INFO lines, no
third-party warnings they cannot act on, and nothing left untracked in a clone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from process_support import Proc

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # this checkout's lora_trainer


def test_demo_prints_only_its_own_lines(tmp_path):
    """The demo (tag, prepare, train, A/B image) shows no library warnings and no internals: the
    engine's "accel: ..." detail is shown with -v only, and library notices such as transformers 5's
    "requires torchvision, falling back" are filtered at their source."""
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "demo", "--out", str(tmp_path / "demo"),
                           "--epochs", "1", "--images", "4"], cwd=tmp_path, capture_output=True, text=True,
                          env=ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if re.search(r"(?i)warn|deprecat|torchvision|\[(transformers|diffusers)\]|traceback|^accel: ", line)]
    assert noise == [], proc.stderr
    assert "LoRA:" in proc.stdout
    # the other shapes are the report's leak-check set, never trained on (no regularisation images)
    assert len(list((tmp_path / "demo" / "leak-check").glob("*.png"))) == 4
    assert not list((tmp_path / "demo" / "dataset").glob("reg/*/*.png"))
    verbose = subprocess.run([sys.executable, "-m", "lora_trainer", "-v", "demo", "--out", str(tmp_path / "demo2"),
                              "--epochs", "1", "--images", "4"], cwd=tmp_path, capture_output=True, text=True,
                             env=ENV, timeout=600, check=False)
    assert verbose.returncode == 0 and "accel: " in verbose.stderr  # still there for whoever asks


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_demo_folder_is_ignored_in_a_clone():
    """`python -m lora_trainer demo` run from the clone's root writes ./lora-trainer-demo/: git ignores it."""
    proc = subprocess.run(["git", "check-ignore", "-q", "lora-trainer-demo/ab.png"], cwd=ROOT, check=False)
    assert proc.returncode == 0


def test_ui_shows_no_library_request_lines_and_stops_on_sigterm(tmp_path):
    """The standalone tab: Gradio 4's own HTTP checks (httpx "HTTP Request: ..." INFO lines) stay out of
    the user's terminal; SIGTERM on an idle tab exits 0 without a traceback."""
    pytest.importorskip("gradio", reason="Gradio is not installed in this stack")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = Proc(["ui", "--tiny", "sd1", "--lora-dir", str(tmp_path / "Lora"), "--work-dir", str(tmp_path / "runs"),
                 "--port", str(port)], cwd=ROOT)
    try:
        proc.wait_for_line(r"Running on local URL")  # Gradio has started and checked its own server
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.stderr
    finally:
        proc.kill()
    assert "HTTP Request" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "SIGTERM received" in proc.stderr


@pytest.mark.parametrize("command", ["tag", "prepare", "train", "serve", "ui"])
def test_every_option_has_help_text(command):
    """`--help` explains every option (train's also shows its defaults)."""
    import argparse

    from lora_trainer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    missing = [a.option_strings or [a.dest] for a in parser._actions if not a.help and a.dest != "help"]
    assert missing == []
    if command == "train":  # the defaults that apply without --preset/--config are shown
        from lora_trainer.config import TrainConfig

        text = " ".join(parser.format_help().split())
        assert f"1..1024 (default: {TrainConfig().rank})" in text
