"""install.py: the WebUI's installer hook adds only missing packages and never changes installed ones.

The planning tests run in-process; the pip tests run the real install.py with real pip in throwaway
venvs (PyPI needed). The full install (torch + transformers 4.30.2, then diffusers/peft/onnxruntime
added) is opt-in with LORA_TRAINER_PIP_TESTS=1 because it installs torch; the integration suite
(tests/webui) runs it in the real A1111 venv.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_install():
    spec = importlib.util.spec_from_file_location("lora_trainer_install_hook", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


inst = _load_install()

A1111 = {"torch": "2.1.2", "transformers": "4.30.2", "huggingface-hub": "0.24.0", "gradio": "3.41.2"}
FORGE = {"torch": "2.3.1", "transformers": "4.46.1", "diffusers": "0.31.0", "peft": "0.13.2",
         "huggingface-hub": "0.26.2"}


def test_a1111_missing_packages_get_bounded_specs():
    # diffusers 0.32+ pipelines import transformers.SiglipImageProcessor, which 4.30.2 lacks
    assert inst.plan(A1111, {}) == ["diffusers>=0.29,<0.32", "peft>=0.13,<0.14", "onnxruntime>=1.16,<1.27"]
    newer = {**A1111, "transformers": "4.46.1"}
    assert inst.plan(newer, {})[0] == "diffusers>=0.29,<0.34"


def test_forge_gets_only_cpu_onnxruntime_when_missing():
    cudnn9 = {"available": True, "cuda": "12.1", "cudnn": 90100}
    assert inst.plan(FORGE, cudnn9, forge=True) == ["onnxruntime>=1.16,<1.27"]
    assert inst.plan({**FORGE, "onnxruntime": "1.20.1"}, {}, forge=True) == []


# Forge Neo: the Feb-2026 tree (3df257ae) pins peft 0.17.1; later Neo trees pin transformers 4.57.6,
# diffusers 0.37.1 and no peft.
NEO = {"torch": "2.10.0", "transformers": "4.56.2", "diffusers": "0.36.0", "peft": "0.17.1",
       "huggingface-hub": "0.34.6", "gradio": "4.40.0"}
NEO_NO_PEFT = {**NEO, "transformers": "4.57.6", "diffusers": "0.37.1"}


def test_neo_gets_only_what_is_missing_in_versions_that_fit_its_transformers():
    assert inst.plan(NEO, {}, forge=True) == ["onnxruntime>=1.16,<1.27"]
    assert inst.plan({k: v for k, v in NEO_NO_PEFT.items() if k != "peft"}, {}, forge=True) == [
        "peft>=0.17,<0.18", "onnxruntime>=1.16,<1.27"]  # peft 0.13 predates transformers 4.56
    assert inst.plan({**NEO, "onnxruntime-gpu": "1.24.0"}, {}, forge=True) == []  # Neo's --onnxruntime-gpu


@pytest.mark.parametrize("args", ["--api --skip-install", "--skip-install", '--api --theme "dark" --skip-install'])
def test_skip_install_in_commandline_args_is_respected(tmp_path, args):
    """The Extensions tab runs install.py with the WebUI's environment: COMMANDLINE_ARGS from webui-user."""
    env = {**os.environ, "LORA_TRAINER_INSTALL_STATUS": str(tmp_path / "s.json"), "COMMANDLINE_ARGS": args}
    res = subprocess.run([sys.executable, str(ROOT / "install.py")], env=env, capture_output=True, text=True,
                         check=True)
    assert "--skip-install" in res.stdout and not (tmp_path / "s.json").exists()


def test_forge_is_detected_from_the_webui_folder(tmp_path, monkeypatch):
    assert inst.is_forge() is False
    (tmp_path / "modules_forge").mkdir()
    (tmp_path / "modules_forge" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))  # install.py runs with PYTHONPATH=<webui folder>
    assert inst.is_forge() is True


def test_rollback_removes_only_what_was_added(tmp_path):
    # Real pip in a throwaway venv: `six` stands for a package we added, `pip` for one that was there.
    py = _venv(tmp_path / "venv", "six")
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('i', sys.argv[1]);"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
            "m.rollback(['six', 'pip'], {'pip': 'x'})")
    subprocess.run([str(py), "-c", code, str(ROOT / "install.py")], check=True, capture_output=True)
    frozen = _freeze(py)
    assert "six==" not in frozen and "pip==" in frozen


def test_present_packages_are_left_alone_whatever_their_version():
    assert inst.plan({**A1111, "diffusers": "0.36.0", "peft": "0.17.0", "onnxruntime": "1.22.0"}, {}) == []


def test_onnxruntime_gpu_only_beside_cuda12_cudnn9_and_never_a_second_variant():
    cudnn9 = {"available": True, "cuda": "12.1", "cudnn": 90100}
    assert inst.onnx_requirement(A1111, cudnn9) == "onnxruntime-gpu>=1.19,<1.27"
    assert inst.onnx_requirement(A1111, {"available": True, "cuda": "12.1", "cudnn": 8902}) == "onnxruntime>=1.16,<1.27"
    assert inst.onnx_requirement(A1111, {"available": True, "cuda": "11.8", "cudnn": 90100}).startswith("onnxruntime>")
    assert inst.onnx_requirement(A1111, {}) == "onnxruntime>=1.16,<1.27"
    for variant in ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime"):
        assert inst.onnx_requirement({**A1111, variant: "1.18.0"}, cudnn9) is None


def test_constraints_pin_every_installed_package():
    text = inst.constraints_text({"b": "2", "a": "1.0"})
    assert text == "a==1.0\nb==2\n"


def test_changes_to_installed_lists_only_version_changes():
    assert inst.changes_to_installed({"diffusers": "0.33.1", "numpy": "2.0.0", "torch": "2.1.2"},
                                     {"numpy": "1.26.2", "torch": "2.1.2"}) == ["numpy 1.26.2 -> 2.0.0"]


def test_skip_install_flag_is_respected(tmp_path):
    env = {**os.environ, "LORA_TRAINER_INSTALL_STATUS": str(tmp_path / "s.json")}
    res = subprocess.run([sys.executable, str(ROOT / "install.py"), "--skip-install"], env=env,
                         capture_output=True, text=True, check=True)
    assert "--skip-install" in res.stdout
    assert not (tmp_path / "s.json").exists()


def _venv(path: Path, *packages: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    py = path / "bin" / "python"
    if packages:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                       check=True, capture_output=True)
    return py


def _freeze(py: Path) -> str:
    return subprocess.run([str(py), "-m", "pip", "freeze", "--all"], check=True, capture_output=True,
                          text=True).stdout


def _run_install(py: Path, status: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LORA_TRAINER_INSTALL_STATUS": str(status), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([str(py), str(ROOT / "install.py")], env=env, capture_output=True, text=True, check=False,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_refuses_and_changes_nothing_when_a_pinned_package_would_have_to_change(tmp_path):
    # diffusers >= 0.29 needs huggingface-hub >= 0.23.2; the venv pins 0.19.4, which must not move.
    py = _venv(tmp_path / "venv", "huggingface-hub==0.19.4")
    before = _freeze(py)
    res = _run_install(py, tmp_path / "status.json")
    assert res.returncode == 0, res.stderr  # never breaks the WebUI's start-up
    assert "LoRA Trainer is disabled" in res.stdout
    assert _freeze(py) == before
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["ok"] is False and "nothing was installed" in status["message"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_TRAINER_PIP_TESTS") != "1",
                    reason="installs torch into a throwaway venv; set LORA_TRAINER_PIP_TESTS=1")
def test_adds_missing_packages_within_bounds_and_changes_nothing_else(tmp_path):
    local_torch = sorted(Path("/opt/wheels").glob("torch-*cp311*.whl")) if Path("/opt/wheels").is_dir() else []
    py = _venv(tmp_path / "venv", str(local_torch[-1]) if local_torch else "torch", "transformers==4.30.2")
    before = dict(line.split("==", 1) for line in _freeze(py).splitlines() if "==" in line)
    res = _run_install(py, tmp_path / "status.json")
    assert res.returncode == 0 and "installed" in res.stdout, res.stdout + res.stderr
    after = dict(line.split("==", 1) for line in _freeze(py).splitlines() if "==" in line)
    assert {k: after.get(k) for k in before} == before  # nothing installed changed
    from packaging.version import Version

    assert Version("0.29") <= Version(after["diffusers"]) < Version("0.32")  # beside transformers 4.30.2
    assert Version("0.13") <= Version(after["peft"]) < Version("0.14")
    assert Version("1.16") <= Version(after["onnxruntime"]) < Version("1.27")
    assert "onnxruntime-gpu" not in after
    # a second run finds everything and installs nothing
    again = _run_install(py, tmp_path / "status2.json")
    assert "adding" not in again.stdout
    assert json.loads((tmp_path / "status2.json").read_text())["ok"] is True
