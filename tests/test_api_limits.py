"""API limits and refusals: body size (413 before the body is read), list lengths, value bounds,
malformed bodies in the documented `{"detail": "..."}` shape, the `model` field, `serve --api-auth`
and `--listen`. Runs on FastAPI 0.94/pydantic 1 (A1111), 0.104/pydantic 2 (Forge) and the newest.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient

from lora_trainer.api import MAX_BODY_BYTES, MAX_LIST_ITEMS, create_app
from lora_trainer.cli import main
from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle

BASE = "/lora-trainer/v1"


def _host(tmp_path, **kw):
    host = StandaloneHost(tmp_path / "Lora", **kw)
    return host, JobManager(host, work_dir=tmp_path / "runs", runner=_never_runs)


def _never_runs(config, **kw):  # these tests only look at what a request is turned into
    raise AssertionError("no training in these tests")


@pytest.fixture
def tiny_client(tmp_path):
    host, jobs = _host(tmp_path, bundle_factory=lambda: build_tiny_bundle("sd1"))
    (tmp_path / "ds").mkdir()
    yield TestClient(create_app(host, jobs)), tmp_path
    jobs.shutdown()


@pytest.fixture
def live_server(tmp_path):
    """Our app under a real uvicorn (in a thread): what `serve` runs, so HTTP framing is real."""
    from lora_trainer.commands.serve import _uvicorn_server, bind_socket

    host, jobs = _host(tmp_path)
    server = _uvicorn_server(create_app(host, jobs), log_level="warning")
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    while not server.started:  # uvicorn's own "ready" flag
        thread.join(0.05)
        assert thread.is_alive()
    yield port
    server.should_exit = True
    thread.join(30)
    jobs.shutdown()


def _response(sock: socket.socket) -> tuple[int, dict]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return status, json.loads(rest[:length])


def test_huge_body_is_refused_from_its_length_before_it_is_sent(live_server):
    """Content-Length 100 MB: the answer is 413 although only one byte of the body was ever sent."""
    with socket.create_connection(("127.0.0.1", live_server), timeout=60) as s:
        s.sendall(b"POST " + BASE.encode() + b"/train HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{")
        status, body = _response(s)
    assert status == 413 and "100,000,000 bytes" in body["detail"] and "limit" in body["detail"]


def test_chunked_body_over_the_limit_is_cut_off(live_server):
    with socket.create_connection(("127.0.0.1", live_server), timeout=60) as s:
        s.sendall(b"POST " + BASE.encode() + b"/tag HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"

        def send():  # the server stops reading after the limit; the rest may hit a closed socket
            try:
                for _ in range(MAX_BODY_BYTES // len(piece) + 4):
                    s.sendall(chunk)
            except OSError:
                pass
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        status, body = _response(s)
    assert status == 413 and "limit" in body["detail"]


@pytest.mark.parametrize("raw, words", [
    (b"[1, 2, 3]", "a list, not a JSON object"),
    (b"null", "null, not a JSON object"),
    (b'"text"', "a string, not a JSON object"),
    (b"42", "a number, not a JSON object"),
    (b"{not json", "not valid JSON (line 1, column 2)"),
    (b"", "has no body"),
    (b'{"data": "caf\xe9"}', "not UTF-8"),
])
def test_malformed_bodies_get_the_documented_shape(tiny_client, raw, words):
    client, _ = tiny_client
    for route in ("train", "tag", "prepare"):
        r = client.post(f"{BASE}/{route}", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail, detail


def test_long_lists_and_strings_get_413(tiny_client):
    client, root = tiny_client
    r = client.post(f"{BASE}/tag", json={"data": str(root), "exclude": ["t"] * (MAX_LIST_ITEMS + 1)})
    assert r.status_code == 413 and "'exclude'" in r.json()["detail"] and "1,001 items" in r.json()["detail"]
    r = client.post(f"{BASE}/train", json={"data": str(root / "ds"), "name": "x" * 70_000})
    assert r.status_code == 413 and "characters" in r.json()["detail"]
    r = client.post(f"{BASE}/train", json={"data": str(root / "ds"), "sample_prompts": ["a cat"] * 65})
    assert r.status_code == 400 and "at most 64" in r.json()["detail"]
    deep = "[" * 5000 + "]" * 5000
    r = client.post(f"{BASE}/train", content=b'{"data": ' + deep.encode() + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "nests deeper" in r.json()["detail"]


@pytest.mark.parametrize("field, value, words", [
    ("rank", 1e9, "rank must be at most 1,024 (got 1,000,000,000); the allowed range is 1..1,024"),
    ("rank", 0, "rank must be at least 1"),
    ("max_steps", 1e12, "max_steps must be at most 1,000,000"),
    ("epochs", 50_000, "epochs must be at most 10,000"),
    ("batch_size", 100_000, "batch_size must be at most 256"),
    ("resolution", 65536, "resolution must be at most 4,096"),
    ("rank", True, "not a valid int"),
    ("rank", 1e400, "not a valid int"),  # JSON's 1e400 is infinity
    ("lr", 1e400, "not a valid float"),
])
def test_absurd_values_are_refused_with_the_range(tiny_client, field, value, words):
    client, root = tiny_client
    raw = json.dumps({"data": str(root / "ds"), "name": "x", field: value})
    r = client.post(f"{BASE}/train", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


def test_model_field_is_refused_when_it_would_be_ignored_and_honoured_otherwise(tiny_client, tmp_path):
    client, root = tiny_client
    r = client.post(f"{BASE}/train", json={"data": str(root / "ds"), "name": "x", "model": "/m.safetensors"})
    assert r.status_code == 400 and "would be ignored" in r.json()["detail"] and "--tiny" in r.json()["detail"]
    assert client.post(f"{BASE}/train", json={"data": str(root / "ds"), "name": "x", "model": ""}).status_code == 200

    default, chosen = tmp_path / "default.safetensors", tmp_path / "chosen.safetensors"
    default.write_bytes(b"x")
    chosen.write_bytes(b"x")
    host = StandaloneHost(tmp_path / "Lora2", model=default)
    jobs = JobManager(host, work_dir=tmp_path / "runs2", runner=_never_runs)
    try:
        job = jobs.get(TestClient(create_app(host, jobs)).post(
            f"{BASE}/train", json={"data": str(root / "ds"), "name": "x", "model": str(chosen)}).json()["job_id"])
        assert job.config.model == str(chosen.resolve())  # what the engine loads (before the host's default)
    finally:
        jobs.shutdown()


@pytest.mark.parametrize("argv, words", [
    (["serve", "--listen"], "without a password"),
    (["serve", "--host", "0.0.0.0"], "--api-auth USER:PASSWORD"),
    (["serve", "--api-auth", "alice"], "is not USER:PASSWORD"),
    (["serve", "--api-auth", "alice:"], "is not USER:PASSWORD"),
    (["ui", "--listen"], "without a password"),
    (["serve", "--port", "http"], "invalid int value"),
])
def test_serve_refusals_are_one_line(argv, words, capsys, tmp_path):
    assert_exit_2(main, [*argv, "--lora-dir", str(tmp_path / "L")], words, capsys)


def test_busy_port_is_one_line(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert_exit_2(main, ["serve", "--port", str(port), "--lora-dir", str(tmp_path / "L")],
                      "pick another port", capsys)


def test_listen_with_auth_or_insisting(tmp_path, monkeypatch):
    from lora_trainer.cli import build_parser
    from lora_trainer.commands.serve import auth_credentials

    parse = build_parser().parse_args
    assert auth_credentials(parse(["serve", "--listen", "--api-auth", "a:b,c:d:e"])) == {"a": "b", "c": "d:e"}
    assert auth_credentials(parse(["serve", "--listen", "--insecure-no-auth"])) == {}
    monkeypatch.setenv("LORA_TRAINER_API_AUTH", "env:pw")
    assert auth_credentials(parse(["serve", "--listen"])) == {"env": "pw"}


def test_serve_help_says_what_is_reachable(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "without --allow, a request may name any folder this user can read or write" in text
    assert "--api-auth USER:PASSWORD" in text and "--insecure-no-auth" in text


def assert_exit_2(fn, argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(fn(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
