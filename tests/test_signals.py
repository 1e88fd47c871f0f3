"""Stop signals on real `train` and `serve` processes: saved, resumable, and an exit status that says so.

Each test waits for an observable state (a step line, a job's step over HTTP) before it signals,
then resumes from what was saved and checks the run goes on from there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import pytest
from process_support import TINY_TRAIN, Proc, http, step_lines, wait_until
from train_support import make_dataset

from lora_trainer.signals import Aborted, GracefulStop, exit_code, safe_streams

pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals"), pytest.mark.slow]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "sd1", seed=0)


def _train_args(ckpt, data, out, name="sig", steps=5000):
    return ["train", "--model", str(ckpt), "--data", str(data), "--name", name, "--out", str(out),
            "--max-steps", str(steps), *TINY_TRAIN]


def _stopped_step(proc: Proc) -> int:
    m = re.search(r"Stopped at step (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(m.group(1))


def test_sigterm_then_resume_then_sighup_with_the_terminal_gone(tmp_path, ckpt):
    """SIGTERM (kill, systemd, Docker) saves the LoRA and the state and exits 143; `--resume` goes on
    from the next step; a closing terminal there (stdout gone, then SIGHUP) saves again and exits 129.
    (SIGINT, Ctrl+C: the next test and `serve` below.)"""
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    first = Proc(_train_args(ckpt, data, out))
    try:
        first.wait_for_line(r"^step 2/5000")
        first.signal(signal.SIGTERM)
        assert first.wait() == 143, first.stderr
    finally:
        first.kill()
    assert "Traceback" not in first.stderr and "SIGTERM received" in first.stderr
    n = _stopped_step(first)
    assert n >= 2 and step_lines(first.lines)[-1] == n
    state = out / "sig-state"
    assert (state / "state.safetensors").is_file() and (out / f"sig-step{n:08d}.safetensors").is_file()
    assert not (out / "sig.safetensors").exists()  # the clean name is only for a finished run

    second = Proc(["train", "--resume", str(state)])
    try:
        second.wait_for_line(rf"^step {n + 2}/5000")
        second.close_stdout()  # every later print fails (EPIPE), as on a terminal that was closed
        second.signal(signal.SIGHUP)
        assert second.wait() == 129, second.stderr
    finally:
        second.kill()
    assert "Traceback" not in second.stderr and "SIGHUP received" in second.stderr
    steps = step_lines(second.lines)
    assert steps[0] == n + 1 and steps == list(range(n + 1, steps[-1] + 1))  # continues, no step repeated
    saves = sorted(out.glob("sig-step*.safetensors"))
    m = int(saves[-1].stem.split("step")[1])
    assert len(saves) == 2 and m > steps[1]  # the second stop saved later than step n + 2
    assert json.loads((state / "config.json").read_text())["max_steps"] == 5000


def test_ctrl_c_on_train_saves_and_the_resume_goes_on(tmp_path, ckpt):
    """SIGINT (Ctrl+C in the terminal) on a real `train`: saved, exit 130; the resume starts at the next step."""
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    first = Proc(_train_args(ckpt, data, out, name="int"))
    try:
        first.wait_for_line(r"^step 2/5000")
        first.signal(signal.SIGINT)
        assert first.wait() == 130, first.stderr
    finally:
        first.kill()
    assert "Traceback" not in first.stderr and "SIGINT received" in first.stderr
    n = _stopped_step(first)
    assert (out / f"int-step{n:08d}.safetensors").is_file() and (out / "int-state" / "state.safetensors").is_file()
    second = Proc(["train", "--resume", str(out / "int-state")])
    try:
        second.wait_for_line(rf"^step {n + 1}/5000")
        second.signal(signal.SIGTERM)
        assert second.wait() == 143, second.stderr
    finally:
        second.kill()
    assert step_lines(second.lines)[0] == n + 1 and "Traceback" not in second.stderr


def test_nohup_keeps_training_through_a_hangup(tmp_path, ckpt):
    """Started with SIGHUP ignored (`nohup ... &`), the run goes on when the terminal closes; `kill` still
    stops it gracefully."""
    data, out = make_dataset(tmp_path / "data"), tmp_path / "out"
    proc = Proc(_train_args(ckpt, data, out, name="nohup"), ignored=(signal.SIGHUP,))
    try:
        proc.wait_for_line(r"^step 2/5000")
        proc.signal(signal.SIGHUP)
        last = step_lines(proc.lines)[-1]
        proc.wait_for_line(rf"^step {last + 3}/5000")  # three more steps after the hang-up: still training
        assert proc.proc.poll() is None and "SIGHUP" not in proc.stderr
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 143, proc.stderr
    finally:
        proc.kill()
    assert "Traceback" not in proc.stderr and (out / "nohup-state" / "state.safetensors").is_file()


def test_second_signal_aborts_and_exit_codes():
    """In-process: the first signal asks for a graceful stop, the second raises Aborted."""
    asked: list[int] = []
    with GracefulStop(asked.append) as stopper:
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked == [signal.SIGTERM] and stopper.exit_code == 143
        with pytest.raises(Aborted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored afterwards
    assert exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGHUP) == 129


def test_safe_streams_survive_a_closed_pipe():
    read_end, write_end = os.pipe()
    stream = os.fdopen(os.dup(write_end), "w")
    os.close(read_end)
    import sys

    saved = sys.stdout
    sys.stdout = stream
    try:
        with safe_streams():
            print("x" * 100_000)  # EPIPE: swallowed, the fd now points at the null device
            print("still running")
    finally:
        sys.stdout = saved
        stream.close()  # its final flush succeeds too
        os.close(write_end)


def _serve(tmp_path, *extra):
    proc = Proc(["serve", "--tiny", "sd1", "--lora-dir", str(tmp_path / "Lora"), "--work-dir",
                 str(tmp_path / "runs"), "--port", "0", *extra])
    m = proc.wait_for_line(r"API on (http://[^/]+)/lora-trainer/v1/status")
    return proc, m.group(1) + "/lora-trainer/v1"


def _job(base, job_id):
    status, job = http("GET", f"{base}/jobs/{job_id}")
    assert status == 200, job
    return job


def test_serve_sigterm_saves_the_running_job_and_resumes_after_restart(tmp_path):
    """SIGTERM on `serve` while a job trains: the step finishes, the LoRA and state are saved, the job
    record says stopped, the process exits 143. A new server lists the job; Resume continues it."""
    data = make_dataset(tmp_path / "data")
    body = {"data": str(data), "name": "srv", "max_steps": 100000, "resolution": 64, "min_bucket_reso": 32,
            "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4, "save_precision": "float"}
    server, base = _serve(tmp_path)
    try:
        status, answer = http("POST", f"{base}/train", body)
        assert status == 200, answer
        job_id = answer["job_id"]
        wait_until(lambda: _job(base, job_id)["step"] >= 2, what="step 2")
        server.signal(signal.SIGTERM)
        assert server.wait() == 143, server.stderr
    finally:
        server.kill()
    assert "Traceback" not in server.stderr
    records = list((tmp_path / "runs").glob("*/job.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["state"] == "stopped" and record["state_dir"], record
    n = record["step"]
    assert n >= 2 and (record["state_dir"] and os.path.isdir(record["state_dir"]))
    assert any("srv-step" in os.path.basename(p) for p in record["outputs"])  # published to the Lora folder
    assert all(os.path.isfile(p) for p in record["outputs"])

    server, base = _serve(tmp_path)
    try:
        assert _job(base, job_id)["state"] == "stopped"
        status, answer = http("POST", f"{base}/jobs/{job_id}/resume")
        assert status == 200, answer
        resumed = answer["job_id"]
        status, again = http("POST", f"{base}/jobs/{job_id}/resume")  # a second Resume is refused
        assert status == 409 and "already being resumed" in again["detail"], again
        job = wait_until(lambda: (j := _job(base, resumed))["step"] >= n + 2 and j, what="resumed steps")
        steps = [s for s, *_ in job["loss_history"]]
        assert steps == list(range(1, steps[-1] + 1))  # one curve: the old steps, then n+1, n+2, ...
        assert job["loss_history"][:n] == record["loss_history"][:n]
        server.signal(signal.SIGINT)
        assert server.wait() == 130, server.stderr
    finally:
        server.kill()
    record = json.loads(records[0].read_text())
    # the resumed job writes its own record in the same run folder
    assert record["id"] == resumed and record["state"] == "stopped" and record["step"] > n


def test_serve_sigterm_says_which_jobs_did_not_start(tmp_path):
    """A job still waiting in the queue when the server stops has nothing to save: the server says so,
    with its id, so the user knows to send it again."""
    data = make_dataset(tmp_path / "data")
    body = {"data": str(data), "max_steps": 100000, "resolution": 64, "min_bucket_reso": 32,
            "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4}
    server, base = _serve(tmp_path)
    try:
        first = http("POST", f"{base}/train", {**body, "name": "one"})[1]["job_id"]
        wait_until(lambda: _job(base, first)["state"] == "running", what="the first job running")
        second = http("POST", f"{base}/train", {**body, "name": "two"})[1]["job_id"]
        assert _job(base, second)["state"] == "queued"
        server.signal(signal.SIGTERM)
        assert server.wait() == 143, server.stderr
    finally:
        server.kill()
    assert "Traceback" not in server.stderr
    assert re.search(rf"job\(s\) did not start training \([^)]*{second}", server.stdout), server.stdout


def test_serve_api_auth_and_idle_sigterm_exits_0(tmp_path):
    """`serve --api-auth user:password` answers 401 without them; an idle server stops with status 0."""
    server, base = _serve(tmp_path, "--api-auth", "alice:s3cret")
    try:
        assert http("GET", f"{base}/status")[0] == 401
        assert http("GET", f"{base}/status", auth="alice:wrong")[0] == 401
        assert http("POST", f"{base}/train", {"data": "/", "name": "x"})[0] == 401
        status, body = http("GET", f"{base}/status", auth="alice:s3cret")
        assert status == 200 and body["host"] == "standalone"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.stderr
    finally:
        server.kill()
    assert "Traceback" not in server.stderr
    assert "INFO" not in server.stderr  # uvicorn's startup and access lines only with -v


def test_signal_handlers_only_in_the_main_thread():
    """From another thread (an embedding program) GracefulStop installs nothing and breaks nothing."""
    result = []

    def body():
        with GracefulStop(result.append) as stopper:
            result.append(stopper.signum)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert result == [None]
