"""JobManager driving the real engine on a tiny SD1 model (CPU, a few steps).

The plain train -> publish path with the real engine is covered by tests/test_api.py and test_ui.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from safetensors import safe_open
from train_support import make_dataset

from lora_trainer.config import TrainConfig
from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle

TINY = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4,
        "alpha": 4.0, "learning_rate": 1e-3, "batch_size": 1, "seed": 7, "save_precision": "float"}


def tiny_config(data: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), name=kw.pop("name", "tiny"), **{**TINY, **kw})


class StopAfterFirstStep(StandaloneHost):
    """Presses the host's Interrupt after the first reported step (as a WebUI user would)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pressed = threading.Event()

    def report(self, event):
        super().report(event)
        if event.kind == "step":
            self.pressed.set()

    def interrupted(self):
        return self.pressed.is_set()


def test_real_engine_interrupt_stops_with_usable_lora_then_resumes(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2, repeats=2, name="shape")
    host = StopAfterFirstStep(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"))
    jm = JobManager(host, work_dir=tmp_path / "runs", poll_interval=0.01)
    job = jm.wait(jm.submit_train(tiny_config(data, epochs=3)).id, 120)
    assert job.state == "stopped", job.error
    assert 1 <= job.step < job.total_steps
    with safe_open(job.outputs[0], "pt") as f:  # a complete LoRA file, loadable as is
        assert any(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118 - not a dict
    assert job.state_dir
    host.pressed.clear()
    host.interrupted = lambda: False  # the user does not press Interrupt this time
    resumed = jm.wait(jm.resume(job.id).id, 120)
    assert resumed.state == "done", resumed.error
    assert resumed.step == resumed.total_steps == job.total_steps
    assert [h[0] for h in resumed.loss_history] == list(range(1, job.total_steps + 1))
    assert resumed.lora_name == "tiny" and job.lora_name == f"tiny-step{job.step:02d}"
    stop_meta = json.loads(Path(job.outputs[1]).read_text())  # the stop save carries full metadata too
    assert stop_meta["sd version"] == "SD1" and stop_meta["activation text"] == "shape"
    with safe_open(job.outputs[0], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1" and f.metadata()["ss_steps"] == str(job.step)


def test_standalone_host_with_a_checkpoint_lets_the_engine_load_it(tmp_path):
    """`serve --model x.safetensors`: the engine loads and places the model itself."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "models", "sd2")
    data = make_dataset(tmp_path / "ds", n=1, repeats=1, name="thing")
    host = StandaloneHost(tmp_path / "Lora", model=ckpt)
    jm = JobManager(host, work_dir=tmp_path / "runs")
    job = jm.wait(jm.submit_train(tiny_config(data, max_steps=1)).id, 120)
    assert job.state == "done", job.error
    assert job.config.model == str(ckpt)
    meta = json.loads(Path(job.outputs[1]).read_text())
    assert meta["sd version"] == "SD2" and meta["activation text"] == "thing"


def test_a_stopped_run_survives_a_restart_and_resumes_from_the_new_manager(tmp_path):
    """The WebUI or server restarts between Stop and Resume: the run is listed again and resumes."""
    data = make_dataset(tmp_path / "ds", n=2, repeats=2, name="shape")
    host = StopAfterFirstStep(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"))
    first = JobManager(host, work_dir=tmp_path / "runs", poll_interval=0.01)
    stopped = first.wait(first.submit_train(tiny_config(data, epochs=3)).id, 120)
    assert stopped.state == "stopped" and stopped.state_dir
    first.shutdown()

    host = StandaloneHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"))
    again = JobManager(host, work_dir=tmp_path / "runs")
    restored = again.latest("train")
    assert restored is not None and restored.id == stopped.id
    assert (restored.state, restored.step, restored.state_dir) == ("stopped", stopped.step, stopped.state_dir)
    assert restored.loss_history == stopped.loss_history and restored.lora_name == stopped.lora_name
    assert again.snapshot(restored.id)["config"] == stopped.config.to_dict()
    resumed = again.wait(again.resume(restored.id).id, 120)
    assert resumed.state == "done", resumed.error
    assert resumed.step == resumed.total_steps == stopped.total_steps
    assert [h[0] for h in resumed.loss_history] == list(range(1, stopped.total_steps + 1))
