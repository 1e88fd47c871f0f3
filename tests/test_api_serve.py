"""`python -m lora_trainer serve` / `ui`: options, host set-up, and a real uvicorn server answering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")

from lora_trainer.cli import build_parser
from lora_trainer.commands.serve import make_host
from lora_trainer.errors import ConfigError


def test_make_host_loopback_allows_any_path(tmp_path):
    args = build_parser().parse_args(["serve", "--tiny", "sd1", "--lora-dir", str(tmp_path / "Lora")])
    host, jobs = make_host(args)
    assert host.name == "standalone" and host.allowed_roots() is None
    assert host.lora_dir() == (tmp_path / "Lora").resolve()
    assert host.acquire_model(None).family.value == "sd1"
    assert jobs.host is host


def test_make_host_beyond_loopback_confines_paths(tmp_path):
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--lora-dir", str(tmp_path / "m" / "Lora")])
    host, _ = make_host(args)
    assert host.allowed_roots() == [(tmp_path / "m").resolve()]
    args = build_parser().parse_args(["ui", "--allow", str(tmp_path), "--lora-dir", str(tmp_path / "L")])
    host, _ = make_host(args)
    assert host.allowed_roots() == [tmp_path.resolve()]


def test_missing_model_is_a_user_error(tmp_path):
    args = build_parser().parse_args(["serve", "--model", str(tmp_path / "none.safetensors")])
    with pytest.raises(ConfigError, match="does not exist"):
        make_host(args)


def test_serve_answers_status(tmp_path):
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "serve", "--port", str(port),
                             "--lora-dir", str(tmp_path / "Lora")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lora-trainer/v1/status", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert body["host"] == "standalone" and body["busy"] is False
    finally:
        proc.terminate()
        proc.wait(20)
