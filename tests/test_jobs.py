"""JobManager with a small stand-in runner (the engine contract: events, stop, TrainResult).

The runner here is a real function that follows `run_training`'s contract exactly but trains
nothing, so the manager's behaviour (queueing, stop, failures, publishing, host calls) is tested in
milliseconds; tests/test_jobs_engine.py runs the real engine on a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.config import TrainConfig
from lora_trainer.errors import TrainingError
from lora_trainer.host import Host, StandaloneHost
from lora_trainer.jobs import JobError, JobManager, JobQueueFullError, UnknownJobError, activation_text
from lora_trainer.train.events import ProgressEvent, TrainingPlan, TrainResult


class RecordingHost(StandaloneHost):
    """A StandaloneHost that records the order of host calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[str] = []
        self.interrupt = threading.Event()
        self.lock_held = threading.Event()

    def acquire_model(self, config):
        self.calls.append("acquire")
        assert self.lock_held.is_set(), "model taken outside the GPU lock"
        return object()

    def release_model(self, bundle):
        self.calls.append("release")

    @contextmanager
    def gpu_lock(self):
        with super().gpu_lock():
            self.calls.append("lock")
            self.lock_held.set()
            try:
                yield
            finally:
                self.lock_held.clear()
                self.calls.append("unlock")

    def interrupted(self):
        return self.interrupt.is_set()


def make_runner(steps: int = 5, *, gate: threading.Event | None = None, fail: BaseException | None = None,
                sample: bool = True, fail_late: BaseException | None = None):
    """A runner with run_training's signature; `gate` makes every step wait until it is set."""

    def runner(config, *, bundle=None, on_event=None, stop=None):
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        plan = TrainingPlan(num_images=2, num_reg_images=0, images_x_repeats=steps, reg_x_repeats=0,
                            samples_per_epoch=steps, batch_size=1, gradient_accumulation_steps=1,
                            batches_per_epoch=steps, steps_per_epoch=steps, epochs=1, total_steps=steps)
        on_event(ProgressEvent("plan", total_steps=steps, total_epochs=1, plan=plan))
        start = 0
        if config.resume:
            start = int((Path(config.resume) / "step.txt").read_text())
        samples, losses, step = [], [], start
        for step in range(start + 1, steps + 1):
            if gate is not None:
                gate.wait(10)
            if fail is not None and step == 2:
                raise fail
            loss = 1.0 / step
            losses.append(loss)
            on_event(ProgressEvent("step", step=step, total_steps=steps, epoch=1, total_epochs=1,
                                   loss=loss, smoothed_loss=loss, lr=1e-4, it_per_s=10.0,
                                   eta_s=(steps - step) / 10))
            if stop is not None and stop.is_set():
                break
        lora = out / f"{config.name}.safetensors"
        lora.write_bytes(b"lora at step %d" % step)
        on_event(ProgressEvent("save", step=step, path=str(lora)))
        if fail_late is not None:
            raise fail_late
        if sample:
            png = out / "sample.png"
            Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
            samples.append(png)
            on_event(ProgressEvent("sample", step=step, paths=[str(png)]))
        state = out / "state"
        state.mkdir(exist_ok=True)
        (state / "step.txt").write_text(str(step))
        stopped = step < steps
        on_event(ProgressEvent("stopped" if stopped else "done", step=step, total_steps=steps))
        return TrainResult(lora_path=lora, saved=[lora], samples=samples, state_dir=state, stopped=stopped,
                           steps=step, final_loss=losses[-1] if losses else None, plan=plan, losses=losses)

    return runner


@pytest.fixture
def dataset(tmp_path):
    d = tmp_path / "data" / "img" / "5_ohwx cat"
    d.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(d / "a.png")
    return tmp_path / "data"


@pytest.fixture
def host(tmp_path):
    return RecordingHost(tmp_path / "Lora")


def wait_running(job, timeout=10.0):
    """Until the runner has started (its plan is out), past waiting for the GPU lock."""
    deadline = time.monotonic() + timeout
    while (job.state == "queued" or not job.plan_text) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.state == "running"


def config(dataset, **kw) -> TrainConfig:
    return TrainConfig(data=str(dataset), name=kw.pop("name", "mylora"), **kw)


def test_standalone_host_is_a_host(tmp_path):
    assert isinstance(StandaloneHost(tmp_path), Host)


def test_train_job_done_publishes_lora_json_preview(host, dataset, tmp_path):
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner())
    job = jm.wait(jm.submit_train(config(dataset), lora_subdir="mine").id, 10)
    assert job.state == "done", job.error
    assert host.calls == ["lock", "acquire", "release", "unlock"]
    lora_dir = (tmp_path / "Lora" / "mine").resolve()
    assert job.lora_name == "mylora"
    assert job.outputs == [str(lora_dir / "mylora.safetensors"), str(lora_dir / "mylora.json"),
                           str(lora_dir / "mylora.preview.png")]
    assert (lora_dir / "mylora.safetensors").read_bytes() == b"lora at step 5"
    meta = json.loads((lora_dir / "mylora.json").read_text())
    assert meta["activation text"] == "ohwx cat"
    assert meta["preferred weight"] == 0.8
    assert "5 steps" in meta["description"]
    assert Image.open(lora_dir / "mylora.preview.png").size == (8, 8)
    assert job.prompt_text == "<lora:mylora:0.8> ohwx cat"
    assert host.saved == [lora_dir / "mylora.safetensors"]
    d = jm.snapshot(job.id)
    assert d["state"] == "done" and d["step"] == 5 and d["total_steps"] == 5
    assert [h[0] for h in d["loss_history"]] == [1, 2, 3, 4, 5]
    assert "Total:" in d["plan"]
    assert [e.kind for e in host.events][:2] == ["plan", "step"]  # mirrored to the host
    json.dumps(d)  # the API returns it as is


def test_host_notes_and_card_version_reach_the_job_and_the_lora_json(host, dataset, tmp_path):
    """A host that trained from the file says so (job notes: UI and API); Neo names families its own way."""
    host.last_notes = ["cannot train on the loaded model in place (fp8); loading m.safetensors from disk instead"]
    host.card_sd_version = lambda label: {"Unknown": "sd"}.get(label, label)
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner())
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "done", job.error
    assert jm.snapshot(job.id)["notes"] == host.last_notes
    meta = json.loads(Path(job.outputs[1]).read_text())
    assert meta["sd version"] == "sd"


def test_second_run_gets_a_fresh_name(host, dataset, tmp_path):
    a = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner()).submit_train(config(dataset))
    a.done_event.wait(10)
    jm = JobManager(host, work_dir=tmp_path / "runs2", runner=make_runner(steps=6))  # another LoRA, same name
    b = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert (a.lora_name, b.lora_name) == ("mylora", "mylora_2")
    assert (tmp_path / "Lora" / "mylora.safetensors").read_bytes() == b"lora at step 5"


def test_one_at_a_time_queue_and_stop(host, dataset, tmp_path):
    gate = threading.Event()
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(gate=gate), max_queued=1)
    first = jm.submit_train(config(dataset, name="one"))
    wait_running(first)
    second = jm.submit_train(config(dataset, name="two"))
    assert second.state == "queued" and "Queued" in second.message
    with pytest.raises(JobQueueFullError, match="already waiting"):
        jm.submit_train(config(dataset, name="three"))
    jm.stop(second.id)  # a queued job never starts
    assert second.state == "stopped"
    gate.set()
    assert jm.wait(first.id, 10).state == "done"
    assert host.calls.count("acquire") == 1


def test_graceful_stop_keeps_a_usable_lora_and_resumes(host, dataset, tmp_path):
    gate = threading.Event()
    runner = make_runner(steps=50, gate=gate)
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=runner)
    job = jm.submit_train(config(dataset))
    wait_running(job)
    jm.stop(job.id)
    gate.set()
    job = jm.wait(job.id, 10)
    assert job.state == "stopped"
    assert job.step < 50
    # the half-trained file says what it is; the user's name stays free for the finished LoRA
    assert Path(job.outputs[0]).is_file() and job.lora_name == f"mylora-step{job.step:02d}"
    assert not (tmp_path / "Lora" / "mylora.safetensors").exists()
    meta = json.loads(Path(job.outputs[1]).read_text())
    assert f"at step {job.step} of 50" in meta["description"] and "Resume" in meta["description"]
    assert "can be resumed" in job.message and job.lora_name in job.message
    resumed = jm.wait(jm.resume(job.id).id, 10)
    assert resumed.state == "done"
    assert resumed.resumed_from == job.state_dir
    assert [h[0] for h in resumed.loss_history] == list(range(1, 51))  # the curve goes on from step 1
    assert resumed.lora_name == "mylora"
    assert (tmp_path / "Lora" / "mylora.safetensors").read_bytes() == b"lora at step 50"
    assert (tmp_path / "Lora" / f"mylora-step{job.step:02d}.safetensors").is_file()  # still listed
    with pytest.raises(JobError, match="cannot be resumed"):
        jm.resume(resumed.id)


def test_a_stopped_job_is_resumed_once(host, dataset, tmp_path):
    """A second Resume of the same stopped job is refused while the first waits or runs, after it
    finished, and after it stopped again (then the newer job is the one to resume)."""
    gate = threading.Event()
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=50, gate=gate))
    job = jm.submit_train(config(dataset))
    wait_running(job)
    jm.stop(job.id)
    gate.set()
    assert jm.wait(job.id, 10).state == "stopped"
    gate.clear()
    second = jm.resume(job.id)
    with pytest.raises(JobError, match=f"already being resumed by job {second.id}"):
        jm.resume(job.id)
    wait_running(second)
    with pytest.raises(JobError, match="already being resumed"):
        jm.resume(job.id)
    jm.stop(second.id)
    gate.set()
    assert jm.wait(second.id, 10).state == "stopped"
    with pytest.raises(JobError, match=f"resume job {second.id} instead"):
        jm.resume(job.id)
    third = jm.wait(jm.resume(second.id).id, 10)
    assert third.state == "done"
    for old in (job, second):
        with pytest.raises(JobError, match=f"already resumed by job {third.id}, which finished"):
            jm.resume(old.id)


def test_concurrent_resume_requests_start_one_run(host, dataset, tmp_path):
    gate = threading.Event()
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=50, gate=gate))
    job = jm.submit_train(config(dataset))
    wait_running(job)
    jm.stop(job.id)
    gate.set()
    jm.wait(job.id, 10)
    gate.clear()
    results: list[object] = []

    def click():
        try:
            results.append(jm.resume(job.id))
        except JobError as e:
            results.append(e)
    threads = [threading.Thread(target=click) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gate.set()
    assert sum(not isinstance(r, JobError) for r in results) == 1


def test_host_interrupt_becomes_graceful_stop(host, dataset, tmp_path):
    gate = threading.Event()
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=50, gate=gate),
                    poll_interval=0.01)
    job = jm.submit_train(config(dataset))
    host.interrupt.set()
    gate.set()
    assert jm.wait(job.id, 10).state == "stopped"
    assert host.calls[-2:] == ["release", "unlock"]


@pytest.mark.parametrize("exc, expected", [
    (TrainingError("The loss became NaN at step 2; lower the learning rate."), "loss became NaN"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "ran out of memory"),
    (ValueError("boom"), "unexpected error (ValueError: boom)"),
])
def test_failures_end_the_job_with_a_message_and_release(host, dataset, tmp_path, exc, expected, caplog):
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(fail=exc))
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "failed"
    assert expected in job.error
    assert "Traceback" not in job.error
    assert host.calls == ["lock", "acquire", "release", "unlock"]
    assert not (tmp_path / "Lora").exists() or not list((tmp_path / "Lora").iterdir())
    # the worker survives a failure
    jm._runner = make_runner()
    ok = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert ok.state == "done"


def test_acquire_failure_fails_cleanly(dataset, tmp_path):
    host = StandaloneHost(tmp_path / "Lora")  # no bundle factory and no model file
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner())
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "failed"
    assert "No model to train on" in job.error
    assert not host.gpu_lock().locked()


def test_generic_jobs_and_unknown_ids(host, tmp_path):
    jm = JobManager(host, work_dir=tmp_path / "runs")

    def tag(job):
        job.progress(1, 2)
        job.progress(2, 2, "tagged 2 images")
        return {"message": "Tagged 2 images.", "count": 2}

    job = jm.wait(jm.submit("tag", tag, label="tag images").id, 10)
    assert job.state == "done" and job.message == "Tagged 2 images."
    assert jm.snapshot(job.id)["result"] == {"message": "Tagged 2 images.", "count": 2}
    assert "lock" in host.calls
    with pytest.raises(UnknownJobError, match="no job"):
        jm.get("nope")


def test_activation_text_from_setting_or_folders(dataset):
    assert activation_text(TrainConfig(data=str(dataset))) == "ohwx cat"
    assert activation_text(TrainConfig(data=str(dataset), activation_text="sks")) == "sks"
    assert activation_text(TrainConfig(data=str(dataset / "img"))) == "ohwx cat"


def test_failure_after_a_save_names_the_last_good_save(host, dataset, tmp_path):
    exc = TrainingError("The loss became NaN at step 5; lower the learning rate.")
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(fail_late=exc))
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "failed"
    assert job.error.startswith("The loss became NaN")
    assert "last good save is kept at" in job.error and job.saves[-1] in job.error
    assert Path(job.saves[-1]).is_file()


def test_stop_while_waiting_for_the_gpu_never_loads_the_model(host, dataset, tmp_path):
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner())
    with host.gpu_lock():  # a generation is running in the host
        job = jm.submit_train(config(dataset))
        deadline = time.monotonic() + 10
        while "Waiting for the GPU" not in job.message and time.monotonic() < deadline:
            time.sleep(0.005)
        assert job.state == "running" and "Waiting for the GPU" in job.message
        jm.stop(job.id)
    assert jm.wait(job.id, 10).state == "stopped"
    assert "acquire" not in host.calls
    assert jm.snapshot(job.id)["config"]["name"] == "mylora"


def test_a_failing_host_display_never_ends_training(dataset, tmp_path):
    class FlakyHost(StandaloneHost):
        def report(self, event):
            raise RuntimeError("progress bar broke")

        def interrupted(self):
            raise RuntimeError("state broke")

        def after_save(self, lora_path):
            raise RuntimeError("refresh broke")

    host = FlakyHost(tmp_path / "Lora", bundle_factory=object)
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(), poll_interval=0.01)
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "done", job.error
    assert Path(job.outputs[0]).is_file()


def test_records_of_earlier_sessions_come_back(host, dataset, tmp_path, caplog):
    # Session 1: one finished run, one run still going when the process "ends".
    gate = threading.Event()
    first = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(3, gate=gate))
    done_cfg = TrainConfig(data=str(dataset), name="early")
    running = first.submit_train(TrainConfig(data=str(dataset), name="late"))
    deadline = time.time() + 10
    while running.state != "running" or not list((tmp_path / "runs").glob("late-*/job.json")):
        assert time.time() < deadline
        time.sleep(0.01)
    (tmp_path / "runs" / "junk").mkdir()
    (tmp_path / "runs" / "junk" / "job.json").write_text("{not json", encoding="utf-8")
    gate.set()
    first.wait(running.id, 10)
    # A record as the process left it mid-run (state "running"): rewrite the finished one back.
    record = next((tmp_path / "runs").glob("late-*/job.json"))
    data = json.loads(record.read_text(encoding="utf-8"))
    data.update(state="running", finished=None, state_dir=None)
    record.write_text(json.dumps(data), encoding="utf-8")
    finished = first.wait(first.submit_train(done_cfg).id, 10)
    first.shutdown()

    with caplog.at_level("WARNING"):
        again = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(3))
    assert "junk" in caplog.text
    restored = {j.config.name: j for j in again.jobs()}
    assert restored["early"].state == "done" and restored["early"].lora_name == finished.lora_name
    assert again.latest("train").config.name == "early"
    late = restored["late"]
    assert late.state == "stopped" and "Interrupted" in late.message and late.state_dir is None
    with pytest.raises(JobError, match="cannot be resumed"):
        again.resume(late.id)


def test_intermediate_saves_are_published_under_names_that_say_what_they_are(host, dataset, tmp_path):
    """Epoch/step saves of a run reach the Lora folder as <name>-epochNN / <name>-stepNN with their own
    json; the finished LoRA keeps the user's name; a name taken by another file gets _2, with a note."""
    def runner(config, *, bundle=None, on_event=None, stop=None):
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        plan = TrainingPlan(num_images=2, num_reg_images=0, images_x_repeats=4, reg_x_repeats=0, samples_per_epoch=4,
                            batch_size=1, gradient_accumulation_steps=1, batches_per_epoch=4, steps_per_epoch=4,
                            epochs=10, total_steps=40)
        on_event(ProgressEvent("plan", total_steps=40, total_epochs=10, plan=plan))
        saved = []
        for tag in ("-000003", "-step00000020", ""):
            f = out / f"{config.name}{tag}.safetensors"
            f.write_bytes(f"lora {tag}".encode())
            saved.append(f)
            on_event(ProgressEvent("save", step=40, path=str(f)))
        png = out / "sample" / f"{config.name}_e000003_00.png"
        png.parent.mkdir()
        Image.new("RGB", (8, 8), (0, 0, 255)).save(png)
        return TrainResult(lora_path=saved[-1], saved=saved, samples=[png], state_dir=None, stopped=False,
                           steps=40, final_loss=0.1, plan=plan, losses=[0.1])

    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    (lora_dir / "mylora.safetensors").write_bytes(b"someone else's file")
    jm = JobManager(host, work_dir=tmp_path / "runs", runner=runner)
    job = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert job.state == "done", job.error
    names = sorted(p.name for p in lora_dir.iterdir())
    assert names == ["mylora-epoch03.json", "mylora-epoch03.preview.png", "mylora-epoch03.safetensors",
                     "mylora-step20.json", "mylora-step20.safetensors", "mylora.safetensors", "mylora_2.json",
                     "mylora_2.preview.png", "mylora_2.safetensors"]
    assert (lora_dir / "mylora.safetensors").read_bytes() == b"someone else's file"  # never overwritten
    assert job.lora_name == "mylora_2" and job.outputs[0] == str((lora_dir / "mylora_2.safetensors").resolve())
    assert any("already in the Lora folder" in n for n in job.notes)
    epoch_meta = json.loads((lora_dir / "mylora-epoch03.json").read_text())
    assert epoch_meta["description"].startswith("Intermediate save after epoch 3 of 10.")
    assert epoch_meta["activation text"] == "ohwx cat"
    step_meta = json.loads((lora_dir / "mylora-step20.json").read_text())
    assert step_meta["description"].startswith("Intermediate save at step 20 of 40.")
    assert host.saved[-1] == (lora_dir / "mylora_2.safetensors").resolve() and len(host.saved) == 3
    # the same run's files published again (a resumed run lists its earlier saves): recognised, left alone
    again = jm.wait(jm.submit_train(config(dataset)).id, 10)
    assert sorted(p.name for p in lora_dir.iterdir()) == names and again.lora_name == "mylora_2"


def test_resumable_lists_each_stopped_run_once_until_it_is_finished(host, dataset, tmp_path):
    """What the tab's "Stopped runs" offers: per run, its newest job decides; a resumed run that
    finished without saving a state of its own (the engine's usual case) is done, not resumable."""
    gate = threading.Event()
    base = make_runner(steps=20, gate=gate)

    def runner(config, **kw):  # as the engine: no state folder when the run ends without a stop
        result = base(config, **kw)
        return result if result.stopped else dataclasses.replace(result, state_dir=None)

    jm = JobManager(host, work_dir=tmp_path / "runs", runner=runner)
    runs = []
    for name in ("a", "b"):
        job = jm.submit_train(config(dataset, name=name))
        wait_running(job)
        jm.stop(job.id)
        gate.set()
        jm.wait(job.id, 10)
        gate.clear()
        runs.append(job)
    assert [j.config.name for j in jm.resumable()] == ["b", "a"]
    held = jm.submit_train(config(dataset, name="c"))  # keeps the resume below waiting in the queue
    wait_running(held)
    again = jm.resume(runs[0].id)
    assert [j.config.name for j in jm.resumable()] == ["b"]  # being resumed: not offered twice
    jm.stop(again.id)  # cancelled before it ran: "a" can still go on
    assert [j.config.name for j in jm.resumable()] == ["a", "b"]  # newest first
    jm.stop(held.id)
    gate.set()
    jm.wait(held.id, 10)
    gate.clear()
    again = jm.resume(runs[0].id)
    wait_running(again)
    jm.stop(again.id)
    gate.set()
    assert jm.wait(again.id, 10).state == "stopped"
    assert [(j.config.name, j.id) for j in jm.resumable()] == [("a", again.id), ("c", held.id), ("b", runs[1].id)]
    finished = jm.wait(jm.resume(again.id).id, 10)
    assert finished.state == "done" and finished.state_dir is None
    assert [j.config.name for j in jm.resumable()] == ["c", "b"]
