""""Did it learn?" (train/report.py): scored every epoch by the engine, on the result, in events, in
the job JSON (real FastAPI routes), printed by the CLI, kept across stop/resume; the best epoch's file is
kept. Tiny random model on the CPU: these check the mechanics, not what the numbers mean."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from flux_support import flux_config, requires_flux_diffusers
from safetensors import safe_open
from train_support import make_dataset, tiny_config, tiny_sd1_ckpt  # noqa: F401 (a fixture)

from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train import report as report_mod
from lora_trainer.train import run_training, validation
from lora_trainer.train.report import LearnReport


def test_a_run_with_regularisation_images_scores_them(tmp_path):
    """The engine scores the regularisation images (their cached latents, their captions) against the trigger's
    pictures at the middle of the schedule; without other pictures only the validation pairs are scored."""
    data = make_dataset(tmp_path / "ds", n=4, repeats=1, reg=3)
    for k, caption in enumerate(sorted((data / "reg" / "1_thing").glob("*.png"))):
        caption.with_suffix(".txt").write_text(f"thing, square, colour {k}", encoding="utf-8")
    bundle = build_tiny_bundle("sd1")
    sizes = []
    handle = bundle.unet.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    try:
        result = run_training(tiny_config(data, tmp_path / "out", epochs=2, batch_size=2), bundle=bundle)
    finally:
        handle.remove()
    rep = result.report
    assert rep["leak_measure"] == report_mod.OTHER_CONCEPTS and rep["other_images"] == 3
    assert rep["other_source"] == report_mod.REGULARISATION
    assert rep["thresholds"] == report_mod.thresholds_for(report_mod.OTHER_CONCEPTS)
    assert all(math.isfinite(e["leak"]) and e["leak"] >= 0 for e in rep["epochs"])
    # the base model: the pairs and both sides once; each epoch: the pairs and both sides (no pure-noise probes)
    pairs, probes = rep["pairs"], min(validation.LEAK_PAIRS, rep["pairs"])
    assert sum(sizes) == 2 * result.steps + 3 * pairs + 3 * (probes + validation.LEAK_PAIRS), sizes
    assert "regularisation images" in report_mod.report_text(rep)
    # without them leakage is not checked, and only the validation pairs are scored (base model, each epoch)
    bundle, sizes = build_tiny_bundle("sd1"), []
    handle = bundle.unet.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    try:
        plain = run_training(tiny_config(make_dataset(tmp_path / "ds2", n=4, repeats=1), tmp_path / "out2",
                                         epochs=2, batch_size=2), bundle=bundle)
    finally:
        handle.remove()
    rep = plain.report
    assert rep["leak_measure"] == report_mod.NOT_CHECKED and rep["thresholds"]["leak_max"] is None
    assert all(e["leak"] is None for e in rep["epochs"]) and "leakage not checked" in report_mod.report_text(rep)
    assert sum(sizes) == 2 * plain.steps + 3 * rep["pairs"], sizes


def test_a_leak_check_set_is_scored_instead_of_the_regularisation_images_and_never_trained_on(tmp_path):
    """`leak_check_dir` (pictures of other concepts with their captions): encoded once by the run's latent and text
    caches, scored as the "other concepts" side in place of the regularisation images, never trained on."""
    from train_support import shape_image

    from lora_trainer.errors import ConfigError, DatasetError
    from lora_trainer.train.planning import plan_training

    data = make_dataset(tmp_path / "ds", n=4, repeats=1, reg=3)
    check = tmp_path / "leak-check"
    check.mkdir()
    for k in range(5):  # one in another bucket
        shape_image(k + 5, (96, 64) if k == 0 else (64, 64)).save(check / f"o{k}.png")
        (check / f"o{k}.txt").write_text(f"circle, colour {k}", encoding="utf-8")
    config = tiny_config(data, tmp_path / "out", epochs=1, batch_size=2, leak_check_dir=str(check))
    plain_steps = plan_training(tiny_config(data, tmp_path / "plan", epochs=1, batch_size=2)).total_steps
    result = run_training(config, bundle=build_tiny_bundle("sd1"))
    rep = result.report
    assert rep["leak_measure"] == report_mod.OTHER_CONCEPTS and rep["other_source"] == report_mod.LEAK_CHECK
    assert rep["other_images"] == 5 and result.steps == plain_steps  # the same steps as without it
    assert math.isfinite(rep["epochs"][0]["leak"]) and rep["epochs"][0]["leak"] > 0
    assert rep["thresholds"] == report_mod.thresholds_for(report_mod.OTHER_CONCEPTS)
    text = report_mod.report_text(rep)
    assert "leakage on 5 leak-check images (never trained on) with their own captions" in text
    assert "leak-check images' prompts changed more than" in text
    (check / "o1.txt").unlink()
    with pytest.raises(DatasetError, match="o1.png has no caption"):
        plan_training(config)
    with pytest.raises(ConfigError, match="Leak-check folder"):
        tiny_config(data, tmp_path / "o", leak_check_dir=str(tmp_path / "missing")).validate(need_model=False)


@requires_flux_diffusers
def test_regularisation_leakage_in_flow_families_and_mixed_buckets(tmp_path):
    """The same measure through a flow family's own draws (sigma 0.5 for the middle of the schedule), with the
    trigger's pictures in two buckets and the regularisation images in one."""
    from lora_trainer.models.flux.tiny import build_tiny_flux_bundle

    data = make_dataset(tmp_path / "ds", n=2, repeats=2, sizes=[(64, 64), (96, 64)], reg=3)
    rep = run_training(flux_config(data, tmp_path / "out"), bundle=build_tiny_flux_bundle()).report
    assert rep["leak_measure"] == report_mod.OTHER_CONCEPTS and rep["other_images"] == 3
    assert math.isfinite(rep["epochs"][0]["leak"]) and rep["epochs"][0]["leak"] > 0


def test_report_every_epoch_on_result_and_events(tmp_path):
    data = make_dataset(tmp_path / "ds", n=4, repeats=1)
    events = []
    result = run_training(tiny_config(data, tmp_path / "out", epochs=2), bundle=build_tiny_bundle("sd1"),
                          on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds.count("validation") == 2 and kinds.index("validation") > kinds.index("epoch")
    rep = result.report
    assert rep["method"] == "training images, fixed noise" and rep["images"] == 4 and rep["pairs"] >= 16
    assert rep["trigger"] == "shape" and math.isfinite(rep["base_loss"])
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2]
    for e in rep["epochs"]:
        assert math.isfinite(e["val_loss"]) and e["leak"] is None  # no other subjects' pictures: not checked
        assert e["improvement"] == pytest.approx(1 - e["val_loss"] / rep["base_loss"])
    assert rep["verdict"] in ("learned", "not_learned") and rep["message"]
    assert rep["best_epoch"] in (1, 2) and rep["best_path"] in [str(p) for p in result.saved]
    assert events[-1].kind == "done"
    assert [e for e in events if e.kind == "validation"][-1].report["epochs"] == rep["epochs"]


def test_scored_captions_share_the_text_cache_call(tmp_path):
    """Frozen text encoder: the scored captions (and a leak-check set's) are encoded in the run's one batched
    caching call, not one by one and not again per epoch."""
    data = make_dataset(tmp_path / "ds", n=3, repeats=1)
    bundle = build_tiny_bundle("sd1")
    calls = []
    handle = bundle.text_encoders[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        result = run_training(tiny_config(data, tmp_path / "out", epochs=2), bundle=bundle)
    finally:
        handle.remove()
    assert calls == [3] and len(result.report["epochs"]) == 2  # the 3 captions


@pytest.mark.parametrize("checkpointing", [False, True])
def test_scoring_runs_in_chunks_that_fit_where_training_does(tmp_path, checkpointing):
    """The scored pairs go through the model 4 at a time (a pass without gradients holds less than a training
    step), or no more at once than a training batch where gradient checkpointing keeps the step small."""
    data = make_dataset(tmp_path / "ds", n=4, repeats=1)
    bundle = build_tiny_bundle("sd1")
    sizes = []

    def seen(module, args, kwargs):
        sizes.append((args[0] if args else kwargs["sample"]).shape[0])

    handle = bundle.unet.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        result = run_training(tiny_config(data, tmp_path / "out", batch_size=2, gradient_checkpointing=checkpointing),
                              bundle=bundle)
    finally:
        handle.remove()
    # training: 2 per step; scoring: the validation loss of the base model and of epoch 1 (no other subjects'
    # pictures: no leakage probes)
    pairs = result.report["pairs"]
    assert max(sizes) == (2 if checkpointing else 4), sizes
    assert sum(sizes) == 2 * result.steps + 2 * pairs, sizes


def test_scoring_leaves_training_unchanged(tmp_path):
    """Validation runs beside training: the losses and weights are those of a run without it."""
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    runs = []
    for every in (0, 1):
        r = run_training(tiny_config(data, tmp_path / f"out{every}", epochs=2, validate_every_n_epochs=every),
                         bundle=build_tiny_bundle("sd1"))
        runs.append(r)
    assert runs[0].report is None and runs[1].report is not None
    assert runs[0].losses == runs[1].losses


def test_best_epoch_file_is_kept(tmp_path, monkeypatch):
    """When an earlier epoch scores best, its LoRA is written as that epoch's save (the final one stays)."""
    judge = LearnReport.judge

    def first_is_best(self):
        judge(self)
        self.best_epoch = 1

    monkeypatch.setattr(LearnReport, "judge", first_is_best)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    result = run_training(tiny_config(data, tmp_path / "out", epochs=3), bundle=build_tiny_bundle("sd1"))
    best = tmp_path / "out" / "tiny-000001.safetensors"
    assert result.report["best_path"] == str(best) and best in result.saved
    assert (tmp_path / "out" / "tiny.safetensors") in result.saved
    with safe_open(str(best), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "1" and meta["ss_steps"] == "2"  # that epoch's weights, that epoch's facts


def test_held_out_images_are_scored_not_trained(tmp_path):
    data = make_dataset(tmp_path / "ds", n=4, repeats=1)
    result = run_training(tiny_config(data, tmp_path / "out", validation_split=0.5), bundle=build_tiny_bundle("sd1"))
    assert result.plan.num_images == 2
    assert result.report["method"] == "held-out" and result.report["images"] == 2


def test_no_trigger_in_captions_means_no_leakage(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2, repeats=1, name="shape")
    for caption in (data / "img" / "1_shape").glob("*.txt"):
        caption.write_text("circle, colour", encoding="utf-8")
    result = run_training(tiny_config(data, tmp_path / "out"), bundle=build_tiny_bundle("sd1"))
    assert result.report["trigger"] == "" and result.report["epochs"][0]["leak"] is None


class _StopAtFirstValidation(StandaloneHost):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pressed = threading.Event()

    def report(self, event):
        super().report(event)
        if event.kind == "validation":
            self.pressed.set()

    def interrupted(self):
        return self.pressed.is_set()


def test_job_json_has_the_report_and_resume_continues_it(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2, repeats=2)
    host = _StopAtFirstValidation(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"))
    jm = JobManager(host, work_dir=tmp_path / "runs", poll_interval=0.01)
    config = tiny_config(data, tmp_path / "unused", epochs=3)
    job = jm.wait(jm.submit_train(config).id, 120)
    assert job.state == "stopped", job.error
    first = job.to_dict()["report"]
    assert first and [e["epoch"] for e in first["epochs"]] == [1]
    host.pressed.clear()
    host.interrupted = lambda: False
    resumed = jm.wait(jm.resume(job.id).id, 120)
    assert resumed.state == "done", resumed.error
    rep = resumed.to_dict()["report"]
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2, 3]
    assert rep["epochs"][0] == first["epochs"][0]
    assert rep["base_loss"] == pytest.approx(first["base_loss"])
    if rep["best_epoch"] == 3:
        assert rep["best_lora"] == resumed.lora_name
    else:
        assert rep["best_lora"].startswith("tiny-epoch")
    assert Path(rep["best_path"]).is_file()


def test_cli_prints_each_epoch_and_the_report(tmp_path, tiny_sd1_ckpt, capsys):
    from lora_trainer.cli import main

    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    argv = ["train", "--model", str(tiny_sd1_ckpt), "--data", str(data), "--name", "cli", "--out",
            str(tmp_path / "o"), "--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128",
            "--bucket-reso-steps", "32", "--rank", "4", "--device", "cpu", "--epochs", "2", "--lr", "1e-3"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("epoch ") and "validation loss" in ln for ln in out) == 2
    start = out.index(next(ln for ln in out if ln.startswith("Did it learn? ")))
    block = out[start:]
    assert block[-1].startswith("LoRA: ")
    assert block[-2].startswith(("Learned:", "Not learned yet:"))  # the verdict (no leakage check without
    # pictures of other subjects)
    assert any(ln.startswith("  thresholds: ") for ln in block) and len(block) <= 12
    # bad settings of the report: exit 2, one line
    assert main([*argv, "--validation-split", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "validation_split must be at least 0 and below 1" in err and "\n" not in err


def test_api_returns_the_report_and_names_the_best_file(tmp_path, monkeypatch):
    """Through the real FastAPI routes: the job JSON carries the report; an earlier best epoch's file is
    published as `<name>-epochNN-best` with a description that says so."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import json
    import time

    from fastapi.testclient import TestClient

    from lora_trainer.api import create_app

    judge = LearnReport.judge

    def first_is_best(self):
        judge(self)
        self.best_epoch = 1

    monkeypatch.setattr(LearnReport, "judge", first_is_best)  # which epoch wins is not what this checks
    root = tmp_path / "allowed"
    data = make_dataset(root / "ds", n=2, repeats=1)
    host = StandaloneHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"), allowed_roots=[root])
    jobs = JobManager(host, work_dir=tmp_path / "runs", poll_interval=0.01)
    client = TestClient(create_app(host, jobs))
    try:
        body = {"data": str(data), "name": "api", "epochs": 3, "resolution": 64, "min_bucket_reso": 32,
                "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4, "lr": 1e-3, "seed": 7}
        r = client.post("/lora-trainer/v1/train", json=body)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 180
        while (job := client.get(f"/lora-trainer/v1/jobs/{r.json()['job_id']}").json())["state"] not in (
                "done", "failed", "stopped"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["state"] == "done", job["error"]
        rep = job["report"]
        assert [e["epoch"] for e in rep["epochs"]] == [1, 2, 3] and rep["best_epoch"] == 1
        assert rep["verdict"] in ("learned", "not_learned", "leaks") and rep["message"]
        assert rep["thresholds"] == {"learned_min_improvement": report_mod.LEARNED_MIN_IMPROVEMENT,
                                     "leak_max": None, "source": report_mod.THRESHOLDS_SOURCE}
        assert rep["best_lora"] == "api-epoch01-best"
        best = (tmp_path / "Lora" / "api-epoch01-best.safetensors").resolve()
        assert str(best) in job["outputs"] and (tmp_path / "Lora" / "api.safetensors").is_file()
        meta = json.loads(best.with_suffix(".json").read_text(encoding="utf-8"))
        assert 'The best epoch by the run\'s "did it learn?" report' in meta["description"]
        short = client.get(f"/lora-trainer/v1/jobs/{job['id']}?history=false").json()
        assert short["report"] == rep
    finally:
        jobs.shutdown()


# Scripted scores (the tiny random model's own do not make this history): validation loss and leakage by epoch,
# the base model's loss first. Every epoch leaks; at epoch 4 epoch 2 falls under the improvement floor and epoch 3,
# never the pick when it was scored, becomes the pick (report.pick_when_every_epoch_leaks).
_LOSSES = [1.0, 0.95, 0.85, 0.75, 0.60]
_LEAKS = [0.90, 0.55, 0.70, 0.95]


def _scripted_scores(monkeypatch):
    real = validation.Validator._score
    scoring = {}

    def score(self):
        losses, predictions = real(self)  # the real scoring runs; its numbers are replaced
        scoring["epoch"] = 0 if self.base is None else len(self.report.epochs) + 1  # (the base model: first)
        return [_LOSSES[scoring["epoch"]]] * len(losses), predictions

    monkeypatch.setattr(validation.Validator, "_score", score)
    monkeypatch.setattr(validation, "_other_ratio", lambda base, lora: _LEAKS[scoring["epoch"] - 1])


def _leak_check_set(folder: Path) -> Path:
    from train_support import shape_image

    folder.mkdir()
    for k in range(2):
        shape_image(k + 5, (64, 64)).save(folder / f"o{k}.png")
        (folder / f"o{k}.txt").write_text(f"circle, colour {k}", encoding="utf-8")
    return folder


def test_an_epoch_picked_only_later_still_has_its_file(tmp_path, monkeypatch):
    """Where every epoch leaks the pick can move back to an epoch scored earlier (one that was not the pick then):
    its weights were kept (`config.candidates_dir()`), so its file is there at the end, with that epoch's facts;
    the candidates are gone after the run."""
    _scripted_scores(monkeypatch)
    seen = []
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=4, leak_check_dir=str(_leak_check_set(tmp_path / "lc")))
    result = run_training(config, bundle=build_tiny_bundle("sd1"),
                          on_event=lambda e: seen.append(e.report["best_epoch"]) if e.kind == "validation" else None)
    rep = result.report
    assert seen == [1, 2, 2, 3] and rep["verdict"] == "leaks" and rep["best_epoch"] == 3
    best = tmp_path / "out" / "tiny-000003.safetensors"
    assert rep["best_path"] == str(best) and best in result.saved
    with safe_open(str(best), "pt") as f:
        assert f.metadata()["ss_epoch"] == "3"
    assert not config.candidates_dir().exists() and not config.state_dir().exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["tiny-000003.safetensors",
                                                                               "tiny.safetensors"]


def test_the_kept_candidates_outlive_a_stop_and_resume(tmp_path, monkeypatch):
    """Stopped after epoch 3 (epoch 3 kept as a candidate, epoch 2 the pick), resumed: epoch 4 makes epoch 3 the
    pick and its file comes from the candidate the stopped run left."""
    _scripted_scores(monkeypatch)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    common = {"epochs": 4, "leak_check_dir": str(_leak_check_set(tmp_path / "lc"))}
    stop, scored = threading.Event(), []

    def on_event(e):
        if e.kind == "validation":
            scored.append(e.report["best_epoch"])
            if len(scored) == 3:
                stop.set()

    first = run_training(tiny_config(data, tmp_path / "out", **common), bundle=build_tiny_bundle("sd1"),
                         on_event=on_event, stop=stop)
    assert first.stopped and scored == [1, 2, 2]
    kept = sorted(p.name for p in (tmp_path / "out" / ".tiny-candidates").iterdir())
    assert kept == ["epoch-000002.candidate", "epoch-000003.candidate"]  # epoch 1 is under the floor: gone
    resumed = run_training(tiny_config(data, tmp_path / "out", resume=str(first.state_dir), **common),
                           bundle=build_tiny_bundle("sd1"))
    rep = resumed.report
    assert rep["best_epoch"] == 3 and rep["best_path"] == str(tmp_path / "out" / "tiny-000003.safetensors")
    with safe_open(rep["best_path"], "pt") as f:
        assert f.metadata()["ss_epoch"] == "3"


def test_a_candidate_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """Where the kept epochs' files cannot be written (here a file stands where their folder goes; a full disk
    alike) the run goes on and ends with its LoRA; the report names no file for a best epoch it could not keep."""
    _scripted_scores(monkeypatch)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=4, leak_check_dir=str(_leak_check_set(tmp_path / "lc")))
    (tmp_path / "out").mkdir()
    config.candidates_dir().write_text("in the way", encoding="utf-8")
    with caplog.at_level("WARNING"):
        result = run_training(config, bundle=build_tiny_bundle("sd1"))
    assert not result.stopped and result.lora_path.is_file()
    assert result.report["best_epoch"] == 3 and result.report["best_path"] is None
    assert "not kept as a candidate" in caplog.text and "best epoch 3 not kept" in caplog.text


def test_candidates_are_written_beside_training_and_the_last_epoch_needs_none(tmp_path, monkeypatch):
    """Each scored epoch's candidate file is written by a thread of its own while the next epoch trains (the main
    thread only takes the CPU copy); the last epoch writes none: the final LoRA, saved next, is that epoch's file."""
    from lora_trainer.lora import kohya_file

    _scripted_scores(monkeypatch)  # the loss falls every epoch: each epoch in turn is the pick, the last one too
    real_save, written = kohya_file.save_kohya, []

    def save(path, state_dict, metadata):
        written.append((Path(path).name, threading.current_thread().name))
        return real_save(path, state_dict, metadata)

    monkeypatch.setattr(kohya_file, "save_kohya", save)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=4)
    result = run_training(config, bundle=build_tiny_bundle("sd1"))
    candidates = [(name, thread) for name, thread in written if name.startswith("epoch-")]
    assert candidates == [(f"epoch-00000{k}.candidate", "lora-candidate") for k in (1, 2, 3)]
    assert result.report["best_epoch"] == 4 and result.report["best_path"] == str(result.lora_path)
    assert not config.candidates_dir().exists()
