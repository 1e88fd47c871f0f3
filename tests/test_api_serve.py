"""`python -m lora_trainer serve` / `ui`: options, host set-up, and a real uvicorn server answering."""

from __future__ import annotations

import json

import pytest
from server_support import cli_server

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
    with cli_server(["serve", "--lora-dir", str(tmp_path / "Lora")], "/lora-trainer/v1/status", timeout=60) as (_, raw):
        body = json.loads(raw)
        assert body["host"] == "standalone" and body["busy"] is False
