"""Which Forge is this (webui/forge_kind.py) and how its loaded weights are stored (webui/forge_storage.py).

The trees are the marker files of real checkouts (listed in docs/forge.md): lllyasviel Forge dfdcbab6 and
29be1da7 (Forge 1.x), Forge Neo 3df257ae, ersatzForge fca12a2, reForge 3b56b268, Forge Classic 1f95d717;
a few look-alike files each, never their code. The storage stand-ins carry the attributes Forge's and
Neo's own parameter classes carry (ParameterGGUF.gguf_cls, ForgeParams4bit.bnb_quantized/quant_type,
scale_weight on fp8_scaled layers, weight_scale on Neo's int8 layers, Nunchaku SVDQ module classes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.webui import forge_kind, forge_storage

COMMON = ("launch.py", "modules/shared.py", "modules_forge/forge_version.py")
TREES = {
    "forge": ("backend/memory_management.py", "packages_3rdparty/gguf/quants.py", "modules_forge/forge_space.py"),
    "neo": ("backend/memory_management.py", "backend/operations_int8.py", "modules_forge/uv_hook.py",
            "modules_forge/packages/huggingface_guess/__init__.py"),
    "ersatzforge": ("backend/memory_management.py", "backend/convert_fp8_scaled.py",
                    "packages/huggingface_guess/__init__.py"),
    "reforge": ("ldm_patched/modules/model_management.py", "ldm_patched/hooks.py", "k_diff/k_diffusion/sampling.py"),
    "forge-classic": ("ldm_patched/modules/model_management.py", "ldm_patched/modules/tomesd.py"),
    "forge-1": ("ldm_patched/modules/model_management.py", "modules_forge/forge_loader.py"),
}


def _tree(root: Path, files: tuple[str, ...]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


@pytest.mark.parametrize("key", sorted(TREES))
def test_each_forge_is_told_apart_by_its_code(tmp_path, key):
    kind = forge_kind.detect_tree(_tree(tmp_path, COMMON + TREES[key]))
    assert kind.key == key and kind.is_forge
    assert kind.loaded_model is (kind.backend == "backend")  # Forge 2.x-style: trains on the loaded model
    assert all((tmp_path / e).exists() for e in kind.evidence) and kind.evidence
    assert kind.label in kind.summary() and "`" not in kind.plain()


def test_version_strings_do_not_decide(tmp_path):
    """Forks reset forge_version.py: Neo says "neo", but a Neo renamed "2.0.1v1.10.1" is still Neo."""
    root = _tree(tmp_path, COMMON + TREES["neo"])
    (root / "modules_forge" / "forge_version.py").write_text('version = "2.0.1v1.10.1"\n')
    assert forge_kind.detect_tree(root).key == "neo"


def test_a1111_and_unknown_forges(tmp_path):
    assert forge_kind.detect_tree(_tree(tmp_path / "a", ("launch.py", "modules/shared.py"))).key == "a1111"
    unknown = forge_kind.detect_tree(_tree(tmp_path / "u", COMMON))
    assert unknown.key == "forge-unknown" and not unknown.loaded_model


def test_what_each_supports_is_said():
    neo = forge_kind._kind("neo", ("backend/operations_int8.py",))
    assert neo.families == ("SD1", "SDXL", "FLUX.1", "Chroma")  # Neo removed SD2; FLUX.1, Chroma: webui/forge_flux.py
    assert "trains on the loaded model" in neo.summary() and "fp8/int8/nf4/GGUF" in neo.summary()
    assert "FLUX.1 and Chroma as stored" in neo.summary() and "FLUX.1" not in forge_kind._kind("reforge").summary()
    assert "from the selected checkpoint file" in forge_kind._kind("reforge").summary()
    assert "Not tested live" in forge_kind._kind("ersatzforge").summary()


def test_detect_finds_the_running_webui_folder(tmp_path, monkeypatch):
    root = _tree(tmp_path / "webui", COMMON + TREES["neo"] + ("modules_forge/__init__.py",))
    monkeypatch.syspath_prepend(str(root))  # the WebUI runs from its folder
    monkeypatch.setattr(forge_kind, "_detected", None)
    assert forge_kind.webui_root() == root.resolve()
    assert forge_kind.detect().key == "neo"
    monkeypatch.setattr(forge_kind, "_detected", None)


# ---------------------------------------------------------------- storage formats
class _Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, **attrs) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
        for k, v in attrs.items():
            setattr(self, k, v)


class SVDQW4A4Linear(torch.nn.Module):  # Nunchaku's class names carry "SVDQ"
    def __init__(self) -> None:
        super().__init__()
        self.qweight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
        self.proj_down = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.bfloat16), requires_grad=False)


def _param(dtype: torch.dtype, **attrs) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(4, 4).to(dtype), requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class Q4_K:  # named like the gguf package's quant classes
    pass


FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.parametrize("make, expected", [
    (lambda: _Linear(torch.zeros(4, 4)), "fp32"),
    (lambda: _Linear(torch.zeros(4, 4, dtype=torch.float16)), "fp16"),
    (lambda: _Linear(torch.zeros(4, 4, dtype=torch.bfloat16)), "bf16"),
    (lambda: _Linear(torch.zeros(4, 4).to(FP8)), "fp8 e4m3fn"),
    (lambda: _Linear(torch.zeros(4, 4).to(FP8), scale_weight=torch.ones(())), "fp8_scaled"),
    # an fp8_scaled file in fp32 storage (Forge main on the CPU): the values are scaled, not the weights
    (lambda: _Linear(torch.zeros(4, 4), scale_weight=torch.ones(())), "fp32 scaled"),
    (lambda: _Linear(torch.zeros(4, 4, dtype=torch.int8), weight_scale=0.1), "int8"),
    (lambda: _Linear(_param(torch.uint8, gguf_cls=Q4_K)), "gguf Q4_K"),
    (lambda: _Linear(_param(torch.uint8, bnb_quantized=True, quant_type="nf4")), "nf4"),
    (lambda: SVDQW4A4Linear(), "svdq (Nunchaku)"),
])
def test_storage_formats_are_named(make, expected):
    if FP8 is None and "fp8" in expected:
        pytest.skip("no float8 in this torch")
    model = torch.nn.Sequential(make())
    report = forge_storage.probe({"UNet": model})
    assert list(report.parts["UNet"]) == [expected]
    assert report.trainable_in_place is (expected in ("fp32", "fp16", "bf16"))
    if not report.trainable_in_place:
        assert report.low_bit_text().startswith(f"UNet in {expected} (")


def test_storage_report_of_a_mixed_model():
    unet = torch.nn.Sequential(_Linear(torch.zeros(4, 4)), _Linear(torch.zeros(4, 4, dtype=torch.int8), weight_scale=1.0))
    te = torch.nn.Sequential(_Linear(torch.zeros(4, 4, dtype=torch.float16)))
    report = forge_storage.probe({"UNet": unet, "text encoder": te})
    assert report.low_bit == [("UNet", "int8", "1.weight")]
    assert report.describe() == "UNet: fp32 (1 weights), int8 (1 weights); text encoder: fp16"


def test_a_low_bit_storage_dtype_counts_before_its_weights_are_converted():
    """bitsandbytes quantises on the first move to the GPU: Forge's storage_dtype says nf4 before that."""
    report = forge_storage.probe({"UNet": torch.nn.Sequential(_Linear(torch.zeros(4, 4)))}, unet_storage="nf4")
    assert report.low_bit == [("UNet", "nf4", "(the UNet's storage_dtype)")]
    fine = forge_storage.probe({"UNet": torch.nn.Sequential(_Linear(torch.zeros(4, 4)))}, unet_storage=torch.float16)
    assert fine.trainable_in_place


def test_lora_cards_get_the_version_name_the_host_uses():
    """Neo's card editor and preset filter know sd/xl/flux (PresetArch); A1111 and Forge know SD1/SDXL."""
    assert forge_kind._kind("neo").card_sd_version("SD1") == "sd"
    assert forge_kind._kind("neo").card_sd_version("SDXL") == "xl"
    assert forge_kind._kind("neo").card_sd_version("Chroma") == "flux"  # Neo runs Chroma under its "flux" preset
    assert forge_kind._kind("neo").card_sd_version("Unknown") == "Unknown"
    assert forge_kind._kind("forge").card_sd_version("SDXL") == "SDXL"
