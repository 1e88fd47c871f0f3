"""HTTP API through FastAPI's TestClient: the real tagger (demo ONNX model), preparer and engine.

Runs on FastAPI 0.94/pydantic 1 (A1111 stack) and newer FastAPI/pydantic 2 (Forge, newest).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.testclient import TestClient
from safetensors import safe_open
from train_support import make_dataset, shape_image

from lora_trainer.api import create_app
from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle

TINY = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4,
        "alpha": 4, "lr": 1e-3, "batch_size": 1, "seed": 7, "save_precision": "float"}
BASE = "/lora-trainer/v1"


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    host = StandaloneHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"),
                          allowed_roots=[root])
    jobs = JobManager(host, work_dir=tmp_path / "runs", poll_interval=0.01)
    client = TestClient(create_app(host, jobs))
    yield client, root, host, jobs
    jobs.shutdown()


def poll(client, job_id, *, until=("done", "failed", "stopped"), timeout=180.0, check=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"{BASE}/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in until or (check is not None and check(job)):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_status(setup):
    client, *_ = setup
    r = client.get(f"{BASE}/status")
    assert r.status_code == 200
    body = r.json()
    assert body["host"] == "standalone" and body["busy"] is False
    assert "sdxl-lowvram" in body["presets"] and body["presets"]["sdxl-lowvram"]["vram_gb"] == 8


def test_tag_prepare_train_poll_done(setup):
    from lora_trainer.tagger.demo_model import write_demo_tagger

    client, root, host, _ = setup
    photos = root / "photos"
    photos.mkdir()
    for i in range(2):
        shape_image(i).save(photos / f"p{i}.png")
    tagger = write_demo_tagger(root / "tagger")

    r = client.post(f"{BASE}/tag", json={"folder": str(photos), "model": str(tagger), "trigger": "ohwx"})
    assert r.status_code == 200, r.text
    job = poll(client, r.json()["job_id"])
    assert job["state"] == "done", job["error"]
    assert (photos / "p0.txt").read_text().startswith("ohwx")
    assert len(job["outputs"]) == 2

    r = client.post(f"{BASE}/prepare", json={"source": str(photos), "concept": "ohwx", "repeats": 1})
    assert r.status_code == 200, r.text
    job = poll(client, r.json()["job_id"])
    assert job["state"] == "done", job["error"]
    data = job["result"]["data"]
    assert (Path(data) / "img" / "1_ohwx").is_dir()
    # no step count for a batch size preparing does not know (it said batch 1 where training used 2)
    assert "= 2 samples per epoch" in job["message"] and "batch size 1" not in job["message"]

    r = client.post(f"{BASE}/train", json={"data": data, "name": "api-lora", "max_steps": 2, **TINY})
    assert r.status_code == 200, r.text
    job = poll(client, r.json()["job_id"])
    assert job["state"] == "done", job["error"]
    assert job["step"] == job["total_steps"] == 2
    assert job["loss"] is not None and job["eta_s"] == 0
    lora = Path(job["outputs"][0])
    assert lora == (host.lora_dir() / "api-lora.safetensors").resolve()
    meta = json.loads(lora.with_suffix(".json").read_text())
    assert meta["sd version"] == "SD1" and meta["activation text"] == "ohwx"
    assert meta["preferred weight"] == 0.8 and "2 steps" in meta["description"]
    with safe_open(str(lora), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118 - not a dict
        assert f.metadata()["ss_network_dim"] == "4"
    assert host.saved == [lora]  # the host was asked to refresh its Lora list
    assert len(job["loss_history"]) == 2
    short = client.get(f"{BASE}/jobs/{job['id']}?history=false").json()
    assert "loss_history" not in short and short["state"] == "done"
    assert job["prompt_text"] == "<lora:api-lora:0.8> ohwx"
    assert job["error"] is None


def test_stop_mid_run_keeps_usable_lora_and_resume(setup):
    client, root, _, _ = setup
    data = make_dataset(root / "ds", n=2, repeats=2, name="shape")
    r = client.post(f"{BASE}/train", json={"data": str(data), "name": "stopme", "epochs": 50, **TINY})
    job_id = r.json()["job_id"]
    poll(client, job_id, check=lambda j: j["step"] >= 1)
    r = client.post(f"{BASE}/jobs/{job_id}/stop")
    assert r.status_code == 200 and r.json()["state"] in ("running", "stopped")
    job = poll(client, job_id)
    assert job["state"] == "stopped", job["error"]
    assert job["step"] < job["total_steps"]
    with safe_open(job["outputs"][0], "pt") as f:  # a complete, loadable LoRA
        assert len(list(f.keys())) > 0
    r = client.post(f"{BASE}/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    resumed = r.json()["job_id"]
    assert client.post(f"{BASE}/jobs/{resumed}/stop").status_code == 200
    assert poll(client, resumed)["state"] == "stopped"
    r = client.post(f"{BASE}/jobs/{job_id}/stop")  # stopping a finished job changes nothing
    assert r.status_code == 200 and r.json()["state"] == "stopped"


@pytest.mark.parametrize("body, status, words", [
    ({"data": "{root}/ds", "name": "x", "rnak": 4}, 400, "Unknown field(s) rnak"),
    ({"data": "{root}/ds", "name": "x", "rank": -1}, 400, "rank must be at least 1"),
    ({"data": "{root}/ds", "name": "x", "rank": "many"}, 400, "not a valid int"),
    ({"data": "{root}/ds", "name": "../evil"}, 400, "path separator"),
    ({"data": "{root}/ds", "name": "x", "lora_subdir": "../../etc"}, 400, "output sub-folder"),
    ({"data": "{root}/nope", "name": "x"}, 400, "does not exist"),
    ({"data": "{root}/../outside", "name": "x"}, 403, "outside the folders"),
    ({"data": "/etc", "name": "x"}, 403, "outside the folders"),
    ({"name": "x"}, 400, "no data folder"),
    ({"data": "{root}/ds", "output_dir": "/tmp"}, 400, "cannot be set in a request"),
    ({"data": "{root}/ds", "resume": "{root}"}, 400, "resume"),
])
def test_bad_train_requests(setup, body, status, words):
    client, root, *_ = setup
    (root / "ds").mkdir(exist_ok=True)
    (root.parent / "outside").mkdir(exist_ok=True)
    body = {k: v.format(root=root) if isinstance(v, str) else v for k, v in body.items()}
    r = client.post(f"{BASE}/train", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_bad_tag_and_prepare_requests_and_unknown_jobs(setup, tmp_path):
    client, root, *_ = setup
    r = client.post(f"{BASE}/tag", json={"data": str(tmp_path)})  # tmp_path is above the root
    assert r.status_code == 403
    r = client.post(f"{BASE}/tag", json={"data": str(root), "threshold": 0.5})
    assert r.status_code == 400 and "Unknown field(s) threshold" in r.json()["detail"]
    r = client.post(f"{BASE}/tag", json={"data": str(root), "general_threshold": 3})
    assert r.status_code == 400 and "outside 0..1" in r.json()["detail"]
    r = client.post(f"{BASE}/prepare", json={"source": str(root)})
    assert r.status_code == 400 and "lacks concept" in r.json()["detail"]
    r = client.post(f"{BASE}/prepare", json={"source": str(root), "concept": "x", "repeats": "many"})
    assert r.status_code == 400 and "whole numbers" in r.json()["detail"]
    r = client.post(f"{BASE}/prepare", json={"source": str(root), "out": str(tmp_path / "o"), "concept": "x"})
    assert r.status_code == 403
    r = client.post(f"{BASE}/train", json=["not", "an", "object"])
    assert 400 <= r.status_code < 500
    assert client.get(f"{BASE}/jobs/nope").status_code == 404
    assert "no job" in client.get(f"{BASE}/jobs/nope").json()["detail"]
    assert client.post(f"{BASE}/jobs/nope/stop").status_code == 404


def test_model_field_is_refused_on_a_webui_host(tmp_path):
    class WebUIish(StandaloneHost):
        name = "a1111"

    (tmp_path / "ds").mkdir()
    client = TestClient(create_app(WebUIish(tmp_path / "Lora"), JobManager(WebUIish(tmp_path / "Lora"))))
    r = client.post(f"{BASE}/train", json={"data": str(tmp_path / "ds"), "model": "/x.safetensors"})
    assert r.status_code == 400 and "would be ignored" in r.json()["detail"]


def test_auth_dependency_is_honoured(tmp_path):
    """The same check as A1111's Api.auth for --api-auth user:pass."""
    security = HTTPBasic()

    def auth(credentials: HTTPBasicCredentials = Depends(security)):  # noqa: B008
        if credentials.username == "u" and secrets.compare_digest(credentials.password, "p"):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    host = StandaloneHost(tmp_path / "Lora")
    client = TestClient(create_app(host, JobManager(host), auth=auth))
    assert client.get(f"{BASE}/status").status_code == 401
    bad = base64.b64encode(b"u:wrong").decode()
    assert client.get(f"{BASE}/status", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"u:p").decode()
    assert client.get(f"{BASE}/status", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert client.post(f"{BASE}/train", json={}).status_code == 401
