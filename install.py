"""Run by the WebUI (A1111 / Forge / Forge Neo) before it starts: add the packages LoRA Trainer needs, safely.

Rules (issue 5): only packages that are missing are added, with version bounds that fit the host's
own pins; every installed package is frozen as a pip constraint; a dry run comes first and we refuse
(console message, feature disabled, WebUI still starts) if anything installed would change; after
installing, an import check runs and what we added is removed again if it fails. onnxruntime-gpu is
chosen only beside a CUDA 12 torch with cuDNN 9, and never beside another onnxruntime variant.

Standard library only: this runs in the WebUI's venv before anything of ours can be imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

EXT_DIR = Path(__file__).resolve().parent
# Read by lora_trainer.webui.common.disabled_reason() to explain a disabled tab.
STATUS_FILE = Path(os.environ.get("LORA_TRAINER_INSTALL_STATUS", EXT_DIR / ".install-status.json"))
PREFIX = "[LoRA Trainer]"

# Bounds that fit A1111 1.10's pins (transformers 4.30.2, huggingface-hub < 1): peft >= 0.14 cannot
# import beside transformers 4.30; diffusers >= 0.34 needs a newer hub/transformers; our own code
# needs diffusers >= 0.29 and peft >= 0.13. Forge already ships diffusers and peft.
REQUIREMENTS: dict[str, str] = {
    "diffusers": ">=0.29,<0.34",
    "peft": ">=0.13,<0.14",
}
# diffusers 0.32+ imports transformers.SiglipImageProcessor (transformers >= 4.37) as soon as a
# pipeline is imported: beside A1111's transformers 4.30.2 only diffusers < 0.32 works.
OLD_TRANSFORMERS_DIFFUSERS = ">=0.29,<0.32"
SIGLIP_TRANSFORMERS = (4, 37)
# Forge Neo (transformers 4.56/4.57, Python 3.13): its Feb-2026 tree pins diffusers 0.36.0 and peft
# 0.17.1, later Neo trees pin diffusers 0.37.1 and no peft; peft 0.13 predates those transformers, so a
# missing peft there gets the release Neo itself ships (tested in CI's Neo stack).
NEO_TRANSFORMERS = (4, 56)
NEO_REQUIREMENTS = {"diffusers": ">=0.36,<0.38", "peft": ">=0.17,<0.18"}
ONNX_BOUNDS = ">=1.16,<1.27"
# onnxruntime-gpu 1.19+ is built for CUDA 12 + cuDNN 9 (earlier CUDA 12 builds need cuDNN 8).
ONNX_GPU_BOUNDS = ">=1.19,<1.27"
ONNX_VARIANTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-silicon", "onnxruntime-rocm")
IMPORT_CHECK = ("import onnxruntime, peft; peft.LoraConfig\n"
                "from diffusers import UNet2DConditionModel, StableDiffusionPipeline, StableDiffusionXLPipeline")
CHECKED_PACKAGES = ("torch", "transformers", "diffusers", "peft", "onnxruntime", "onnxruntime-gpu",
                    "huggingface-hub", "accelerate")


def say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution this interpreter sees."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def torch_gpu_facts() -> dict[str, object]:
    """CUDA/cuDNN of the installed torch, in a child process (importing torch here is slow and
    would keep its DLLs loaded while pip works on Windows)."""
    code = ("import json, torch\n"
            "ok = torch.cuda.is_available()\n"
            "print(json.dumps({'cuda': torch.version.cuda, 'available': ok,\n"
            "  'cudnn': torch.backends.cudnn.version() if ok else None}))")
    try:
        res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {}


def is_forge() -> bool:
    """Forge (and its forks) ship `modules_forge` in the WebUI folder, which is on PYTHONPATH here."""
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def onnx_requirement(installed: dict[str, str], gpu: dict[str, object], *, forge: bool = False) -> str | None:
    """The onnxruntime variant to add, or None when any variant is already there. On Forge only the
    CPU build (Forge pins its CUDA stack; the tagger is fast enough on the CPU)."""
    if any(v in installed for v in ONNX_VARIANTS):
        return None
    if forge:
        return "onnxruntime" + ONNX_BOUNDS
    cuda, cudnn = str(gpu.get("cuda") or ""), gpu.get("cudnn") or 0
    if gpu.get("available") and cuda.startswith("12.") and isinstance(cudnn, int) and cudnn >= 90000:
        return "onnxruntime-gpu" + ONNX_GPU_BOUNDS
    return "onnxruntime" + ONNX_BOUNDS


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def requirement_specs(installed: dict[str, str]) -> dict[str, str]:
    specs = dict(REQUIREMENTS)
    transformers = installed.get("transformers")
    if transformers and _version_tuple(transformers) < SIGLIP_TRANSFORMERS:
        specs["diffusers"] = OLD_TRANSFORMERS_DIFFUSERS
    elif transformers and _version_tuple(transformers) >= NEO_TRANSFORMERS:
        specs.update(NEO_REQUIREMENTS)
    return specs


def plan(installed: dict[str, str], gpu: dict[str, object], *, forge: bool = False) -> list[str]:
    """Requirement strings for what is missing; present packages are left alone whatever their version."""
    wanted = [name + spec for name, spec in requirement_specs(installed).items() if canonical(name) not in installed]
    onnx = onnx_requirement(installed, gpu, forge=forge)
    if onnx:
        wanted.append(onnx)
    return wanted


def constraints_text(installed: dict[str, str]) -> str:
    """Every installed package pinned to its version: pip may add packages but change none."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def index_args() -> list[str]:
    """The WebUI's own index choice (launch_utils.index_url, from $INDEX_URL), as run_pip uses it."""
    index_url = os.environ.get("INDEX_URL", "")
    return ["--index-url", index_url] if index_url else []


def run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    # Not launch.run_pip: we need pip's exit status and its --report file, not an exception.
    return subprocess.run([sys.executable, "-m", "pip", *args, *index_args(), "--prefer-binary",
                           "--disable-pip-version-check"], check=False, capture_output=True, text=True)


def dry_run(wanted: list[str], constraints: Path, report: Path) -> tuple[dict[str, str] | None, str]:
    """({name: version} pip would install, "") or (None, why it cannot)."""
    res = run_pip(["install", "--dry-run", "--quiet", "--report", str(report), "-c", str(constraints), *wanted])
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if not ln.startswith("WARNING:")]
        tail = "\n".join(lines[-8:])
        return None, tail or f"pip exited with {res.returncode}"
    data = json.loads(report.read_text(encoding="utf-8"))
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in data.get("install", [])}, ""


def changes_to_installed(would_install: dict[str, str], installed: dict[str, str]) -> list[str]:
    return [f"{name} {installed[name]} -> {ver}" for name, ver in sorted(would_install.items())
            if name in installed and installed[name] != ver]


def write_status(ok: bool, message: str, versions: dict[str, str | None] | None = None) -> None:
    try:
        STATUS_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=STATUS_FILE.parent, prefix=".install-status.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"ok": ok, "message": message, "versions": versions or {}}, f)
        os.replace(tmp, STATUS_FILE)
    except OSError:
        pass  # the console message is what matters; the tab falls back to the import error


def refuse(message: str) -> int:
    say(message)
    say("LoRA Trainer is disabled; the WebUI starts normally without it.")
    write_status(False, message)
    return 0  # never fail the WebUI's start-up


def skip_install_requested() -> bool:
    """--skip-install on our command line, in COMMANDLINE_ARGS (webui-user.sh/.bat: how A1111, Forge and
    Neo users pass flags, inherited when the Extensions tab runs us) or in the launcher's parsed args."""
    import shlex

    try:
        env_args = shlex.split(os.environ.get("COMMANDLINE_ARGS", ""), posix=os.name != "nt")
    except ValueError:
        env_args = os.environ.get("COMMANDLINE_ARGS", "").split()
    if "--skip-install" in sys.argv or "--skip-install" in env_args:
        return True
    try:
        import launch  # the WebUI's launcher module (PYTHONPATH is the WebUI folder here)

        return bool(getattr(getattr(launch, "args", None), "skip_install", False))
    except Exception:  # noqa: BLE001 - launch parses the WebUI's argv; any failure means "not given"
        return False


def main() -> int:
    if skip_install_requested():
        say("--skip-install given: not checking or installing packages.")
        return 0
    installed = installed_versions()
    forge = is_forge()
    gpu = torch_gpu_facts() if not forge and not any(v in installed for v in ONNX_VARIANTS) else {}
    wanted = plan(installed, gpu, forge=forge)
    if not wanted:
        return check_present(installed)
    say(f"adding missing packages: {', '.join(wanted)}")
    with tempfile.TemporaryDirectory(prefix="lora-trainer-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(installed), encoding="utf-8")
        would, why = dry_run(wanted, constraints, Path(tmp) / "report.json")
        if would is None:
            return refuse("pip cannot add " + ", ".join(wanted) + " without changing packages the WebUI "
                          "already has, so nothing was installed. Install them by hand in the WebUI's "
                          f"venv if you accept the change. pip said:\n{why}")
        changed = changes_to_installed(would, installed)
        if changed:
            return refuse("installing would change packages the WebUI already has (" + "; ".join(changed)
                          + "), so nothing was installed; install matching versions by hand.")
        added = sorted(would)
        if "onnxruntime" in added and "onnxruntime-gpu" in added:  # never both variants
            return refuse("pip wanted both onnxruntime and onnxruntime-gpu; nothing was installed. "
                          "Install one onnxruntime variant by hand.")
        pins = [f"{name}=={ver}" for name, ver in sorted(would.items())]
        res = run_pip(["install", "--no-deps", "-c", str(constraints), *pins])
        if res.returncode != 0:
            rollback(added, installed)
            return refuse("pip failed while installing " + ", ".join(pins) + "; what was added was "
                          "removed again. pip said:\n" + "\n".join((res.stderr or "").splitlines()[-8:]))
    check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=False, capture_output=True, text=True)
    after = installed_versions()
    changed = [f"{n} {v} -> {after.get(n)}" for n, v in installed.items() if after.get(n) != v]
    if check.returncode != 0 or changed:
        rollback(added, installed)
        why = (check.stderr or "").strip().splitlines()[-1:] or changed
        return refuse("the new packages do not import beside the WebUI's (" + "; ".join(why)
                      + "); they were removed again.")
    say("installed " + ", ".join(pins))
    write_status(True, "installed " + ", ".join(pins), {name: after.get(name) for name in CHECKED_PACKAGES})
    return 0


def check_present(installed: dict[str, str]) -> int:
    """Nothing to install: still make sure what is there imports together (once per set of versions)."""
    versions = {name: installed.get(name) for name in CHECKED_PACKAGES}
    try:
        previous = json.loads(STATUS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    if previous.get("ok") and previous.get("versions") == versions:
        return 0
    check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=False, capture_output=True, text=True)
    if check.returncode != 0:
        why = ((check.stderr or "").strip().splitlines() or ["import failed"])[-1]
        return refuse(f"the installed packages do not import together ({why}); with transformers "
                      f"{installed.get('transformers')} install diffusers{requirement_specs(installed)['diffusers']} "
                      "in the WebUI's venv, then restart.")
    write_status(True, "all packages present", versions)
    return 0


def rollback(added: list[str], before: dict[str, str]) -> None:
    """Remove only what we added (packages that were not there before)."""
    ours = [name for name in added if name not in before and name in installed_versions()]
    if ours:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *ours], check=False, capture_output=True, text=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - never break the WebUI's start-up
        sys.exit(refuse(f"the installer failed unexpectedly ({exc!r}); nothing more was changed."))
