"""A run's output names are claimed before step 1 (two runs never write the same files), every output
is checked to be writable with room on the disk, and nothing is overwritten without --overwrite."""

from __future__ import annotations

import json
import re
import signal
import threading

import pytest
from process_support import TINY_TRAIN, Proc, run_cli, unprivileged_prefix
from train_support import make_dataset, tiny_config

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.train import outputs
from lora_trainer.train.engine import planned_files
from lora_trainer.train.outputs import CLAIMS_DIR, OutputsInUseError, claim_outputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "sd1", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _argv(ckpt, data, out, *extra, name="same"):
    return ["train", "--model", str(ckpt), "--data", str(data), "--name", name, "--out", str(out), *TINY_TRAIN,
            *extra]


def _one_line_exit_2(code, err, words):
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_two_runs_with_the_same_name_and_a_killed_runs_claim(tmp_path, ckpt, data):
    """Run A trains; run B with the same --out/--name is refused at once, naming A's process. A is
    killed (SIGKILL: no clean-up at all); run C of the same name then claims the names and finishes."""
    out = tmp_path / "out"
    first = Proc(_argv(ckpt, data, out, "--max-steps", "5000"))
    try:
        first.wait_for_line(r"^step 1/5000")
        second = run_cli(_argv(ckpt, data, out, "--max-steps", "3"))
        _one_line_exit_2(second.returncode, second.stderr, f"Another training run (process {first.pid}")
        assert "step " not in second.stdout  # refused before any training
        info = json.loads((out / CLAIMS_DIR / "same.json").read_text())
        assert info["pid"] == first.pid
        first.proc.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        first.kill()
    assert (out / CLAIMS_DIR / "same.lock").exists()  # the killed run's claim is still on disk...
    third = run_cli(_argv(ckpt, data, out, "--max-steps", "3"))
    assert third.returncode == 0, third.stderr  # ...but free: the OS lock died with the process
    assert (out / "same.safetensors").is_file() and "step 3/3" in third.stdout
    assert sorted(p.name for p in (out / CLAIMS_DIR).iterdir()) == ["claims.lock"]  # released and tidied


def test_claims_in_one_process(tmp_path, data):
    out = tmp_path / "out"
    config = tiny_config(data, out, name="cat", epochs=4, save_every_n_epochs=1)
    plan_files = [out / f"cat-{e:06d}.safetensors" for e in (1, 2, 3)] + [out / "cat.safetensors"]
    first = claim_outputs(config, plan_files)
    try:
        with pytest.raises(OutputsInUseError, match=r"Another training run \(process \d+.*is writing cat into"):
            claim_outputs(tiny_config(data, out, name="cat"), [out / "cat.safetensors"])
        # another name whose final file is one of cat's epoch saves
        with pytest.raises(OutputsInUseError, match="named cat is writing cat-000002.safetensors"):
            claim_outputs(tiny_config(data, out, name="cat-000002"), [out / "cat-000002.safetensors"])
        with claim_outputs(tiny_config(data, out, name="dog"), [out / "dog.safetensors"]) as dog:
            assert dog.held  # other names are free
        assert not (out / CLAIMS_DIR / "dog.lock").exists()
    finally:
        first.release()
    with claim_outputs(tiny_config(data, out, name="cat"), [out / "cat.safetensors"]):
        pass


def test_many_threads_claim_one_name_one_wins(tmp_path, data):
    out = tmp_path / "out"
    results: list[object] = []
    barrier = threading.Barrier(6)

    def claim():
        barrier.wait()
        try:
            results.append(claim_outputs(tiny_config(data, out, name="race"), [out / "race.safetensors"]))
        except OutputsInUseError as e:
            results.append(e)
    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, Exception)]
    assert len(won) == 1
    won[0].release()


def test_stale_claim_files_of_other_names_are_tidied(tmp_path, data):
    out = tmp_path / "out"
    claims = out / CLAIMS_DIR
    claims.mkdir(parents=True)
    (claims / "gone.lock").write_text("")  # what a killed run of another name leaves: nobody holds it
    (claims / "gone.json").write_text(json.dumps({"pid": 999999, "files": ["mine.safetensors"]}))
    with claim_outputs(tiny_config(data, out, name="mine"), [out / "mine.safetensors"]):
        assert not (claims / "gone.lock").exists() and not (claims / "gone.json").exists()


def test_preflight_refusals_before_the_model_loads(tmp_path, ckpt, data, capsys):
    """Each refusal comes before loading the model (no plan printed): one line, exit 2."""
    cases = []
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases.append((_argv(ckpt, data, a_file), "is a file, not a folder"))
    cases.append((_argv(ckpt, data, a_file / "sub"), "cannot be created because"))
    folder_in_the_way = tmp_path / "o1"
    (folder_in_the_way / "same.safetensors").mkdir(parents=True)
    cases.append((_argv(ckpt, data, folder_in_the_way), "is a folder, where the LoRA file goes"))
    existing = tmp_path / "o2"
    existing.mkdir()
    (existing / "same.safetensors").write_bytes(b"a finished LoRA")
    cases.append((_argv(ckpt, data, existing), "already exists"))
    stopped = tmp_path / "o3"
    (stopped / "same-state").mkdir(parents=True)
    (stopped / "same-state" / "config.json").write_text("{}")
    cases.append((_argv(ckpt, data, stopped), "holds the resumable state of an earlier run"))
    for argv, words in cases:
        code = main(argv)
        captured = capsys.readouterr()
        _one_line_exit_2(code, captured.err, words)
        assert "step" not in captured.out and "Caching" not in captured.out, argv
    assert (existing / "same.safetensors").read_bytes() == b"a finished LoRA"


def test_full_disk_is_refused_before_step_1(tmp_path, ckpt, data, capsys, monkeypatch):
    """Mocked: a full disk cannot be made here, so `free_bytes` says 5 MiB are left."""
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 5 << 20)
    code = main(_argv(ckpt, data, tmp_path / "out", "--max-steps", "2"))
    captured = capsys.readouterr()
    _one_line_exit_2(code, captured.err, "has 5 MiB free, but this run writes about")
    assert "step 1/" not in captured.out
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_resumed_run_reclaims_its_own_names(tmp_path, data):
    """A stopped run's saves may be rewritten by the run that resumes it; a new run may not."""
    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.train import run_training

    out = tmp_path / "out"
    stop = threading.Event()
    stop.set()
    config = tiny_config(data, out, name="r", epochs=3, save_every_n_epochs=1)
    first = run_training(config, bundle=build_tiny_bundle("sd1"), stop=stop)
    assert first.stopped and first.state_dir.is_dir()
    with pytest.raises(ConfigError, match="holds the resumable state"):
        run_training(tiny_config(data, out, name="r", epochs=3, save_every_n_epochs=1),
                     bundle=build_tiny_bundle("sd1"))
    resumed = run_training(tiny_config(data, out, name="r", epochs=3, save_every_n_epochs=1,
                                       resume=str(first.state_dir)), bundle=build_tiny_bundle("sd1"))
    assert not resumed.stopped and resumed.lora_path == out / "r.safetensors"
    assert sorted(p.name for p in (out / CLAIMS_DIR).iterdir()) == ["claims.lock"]


def test_planned_files_are_the_fixed_names(tmp_path, data):
    from lora_trainer.train import plan_training

    config = tiny_config(data, tmp_path, name="n", epochs=3, save_every_n_epochs=1, save_every_n_steps=4)
    names = [p.name for p in planned_files(config, plan_training(config))]
    assert names[0] == "n.safetensors" and "n-000001.safetensors" in names and "n-step00000004.safetensors" in names
    assert all(re.fullmatch(r"n(-\d{6}|-step\d{8})?\.safetensors", n) for n in names)


@pytest.mark.slow
def test_read_only_output_folder_is_refused_before_training(tmp_path, ckpt, data):
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("no way to make a folder read-only for this user here")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro, ro / "new"):
            proc = run_cli(_argv(ckpt, data, out), prefix=prefix)
            _one_line_exit_2(proc.returncode, proc.stderr, "Cannot write into")
            assert "step" not in proc.stdout
    finally:
        ro.chmod(0o755)


def test_claim_error_is_a_user_error():
    assert issubclass(OutputsInUseError, LoraTrainerError)
