"""Which Forge is this? Read from the WebUI's own files, never from a version string.

Forks rename and reset their version strings (`modules_forge/forge_version.py` says "neo",
"classic", "f2.ersatz", "1.0.0v2-v1.10.1RC"...), so we look at what their code *is*: where the
model lives (Forge 2.x `backend/` or the older `ldm_patched/`) and a few files only one fork has.
Markers, checked against the trees named in docs/forge.md:

| kind | model code | marker files |
| --- | --- | --- |
| `forge` (lllyasviel main, 2.x) | `backend/` | none of the forks' markers (`packages_3rdparty/` usually) |
| `neo` (Haoming02 sd-webui-forge-classic, branch neo) | `backend/` | `modules_forge/packages/huggingface_guess/` (vendored), `backend/operations_int8.py`, `modules_forge/uv_hook.py` |
| `ersatzforge` (DenOfEquity) | `backend/` | `packages/huggingface_guess/` (vendored at the top), `backend/convert_fp8_scaled.py` |
| `reforge` (Panchovix) | `ldm_patched/` | `ldm_patched/hooks.py`, `k_diff/` |
| `forge-classic` (Haoming02, branch classic) | `ldm_patched/` | `ldm_patched/modules/tomesd.py` |
| `forge-1` (lllyasviel before Aug 2024) | `ldm_patched/` | none of the above |

No `modules_forge/` at all: AUTOMATIC1111 (`a1111`). Standard library only, no host import: the
flux-forge hand-off and install.py's logic can use it too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

# (marker path relative to the WebUI folder, what it shows); any one marker identifies the fork.
NEO_MARKERS = ("modules_forge/packages/huggingface_guess", "backend/operations_int8.py", "modules_forge/uv_hook.py")
ERSATZ_MARKERS = ("packages/huggingface_guess", "backend/convert_fp8_scaled.py")
REFORGE_MARKERS = ("ldm_patched/hooks.py", "k_diff")
CLASSIC_MARKERS = ("ldm_patched/modules/tomesd.py",)
BACKEND_MARKER = "backend/memory_management.py"  # Forge 2.x model code (HF-style components)
LDM_PATCHED_MARKER = "ldm_patched/modules/model_management.py"  # Forge 1.x-style (ComfyUI fork)

# The "sd version" a host's Lora cards understand, by our family label (Family.label). Neo's card
# metadata editor and its "Filter Lora based on selected Preset" use its preset names
# (modules_forge/presets.py PresetArch: sd, xl, flux, ...; Chroma has no preset of its own, it runs under
# "flux"); A1111 and Forge use the labels as they are.
CARD_VERSIONS = {"neo": {"SD1": "sd", "SDXL": "xl", "Flux": "flux", "Chroma": "flux"}}

# Storage the Forge 2.x hand-off trains on in place; everything else comes from the file (or is refused).
IN_PLACE_STORAGE = "fp32, fp16, bf16"


@dataclass(frozen=True)
class ForgeKind:
    """One WebUI flavour and what LoRA Trainer does in it."""

    key: str  # a1111 | forge | neo | ersatzforge | reforge | forge-classic | forge-1
    label: str
    backend: str  # "backend" (Forge 2.x), "ldm_patched" (older forks), "ldm" (A1111)
    families: tuple[str, ...]  # model families LoRA Trainer trains in this host
    loaded_model: bool  # trains on the model in memory (else: from the checkpoint file)
    tested: bool  # run live by the opt-in integration suites (docs/forge.md names the commits)
    evidence: tuple[str, ...] = ()  # marker files found

    @property
    def is_forge(self) -> bool:
        return self.key != "a1111"

    def card_sd_version(self, label: str) -> str:
        """Our family label ("SD1", "SDXL") as this host's Lora cards name it ("sd", "xl" in Neo)."""
        return CARD_VERSIONS.get(self.key, {}).get(label, label)

    def plain(self) -> str:
        """summary() for the console."""
        return self.summary().replace("**", "").replace("`", "")

    def summary(self) -> str:
        """One markdown line for the tab: which WebUI this is and what training does here."""
        flux = ("; " + " and ".join(f for f in ("FLUX.1", "Chroma") if f in self.families)
                + " as stored, fp8/nf4/GGUF included") if "FLUX.1" in self.families else ""
        how = (f"trains on the loaded model ({IN_PLACE_STORAGE} weights; fp8/int8/nf4/GGUF storage of an SD model "
               f"trains from the checkpoint file{flux})" if self.loaded_model
               else "trains from the selected checkpoint file")
        found = f" Detected from: {', '.join(f'`{e}`' for e in self.evidence)}." if self.evidence else ""
        untested = "" if self.tested else " Not tested live by LoRA Trainer."
        return f"**{self.label}**: {', '.join(self.families)}; {how}.{found}{untested}"


def _kind(key: str, evidence: tuple[str, ...] = ()) -> ForgeKind:
    table = {
        "a1111": ("AUTOMATIC1111 Stable Diffusion WebUI", "ldm", ("SD1", "SD2", "SDXL"), True, True),
        "forge": ("Stable Diffusion WebUI Forge (lllyasviel, 2.x)", "backend", ("SD1", "SD2", "SDXL", "FLUX.1", "Chroma"), True, True),
        "neo": ("Forge Neo", "backend", ("SD1", "SDXL", "FLUX.1", "Chroma"), True, True),
        "ersatzforge": ("ersatzForge", "backend", ("SD1", "SD2", "SDXL", "FLUX.1"), True, False),
        "reforge": ("reForge", "ldm_patched", ("SD1", "SD2", "SDXL"), False, False),
        "forge-classic": ("Forge Classic", "ldm_patched", ("SD1", "SD2", "SDXL"), False, False),
        "forge-1": ("Forge 1.x (before the 2024 backend)", "ldm_patched", ("SD1", "SD2", "SDXL"), False, False),
        "forge-unknown": ("an unrecognised Forge", "unknown", ("SD1", "SD2", "SDXL"), False, False),
    }
    label, backend, families, loaded, tested = table[key]
    return ForgeKind(key, label, backend, families, loaded, tested, evidence)


def detect_tree(root: str | Path) -> ForgeKind:
    """The kind of the WebUI checked out at `root` (its folder with launch.py)."""
    root = Path(root)

    def found(markers: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m for m in markers if (root / m).exists())

    if not (root / "modules_forge").is_dir():
        return _kind("a1111")
    if (root / BACKEND_MARKER).is_file():
        for key, markers in (("neo", NEO_MARKERS), ("ersatzforge", ERSATZ_MARKERS)):
            hits = found(markers)
            if hits:
                return _kind(key, (BACKEND_MARKER, *hits))
        return _kind("forge", (BACKEND_MARKER,))
    if (root / LDM_PATCHED_MARKER).is_file():
        for key, markers in (("reforge", REFORGE_MARKERS), ("forge-classic", CLASSIC_MARKERS)):
            hits = found(markers)
            if hits:
                return _kind(key, (LDM_PATCHED_MARKER, *hits))
        return _kind("forge-1", (LDM_PATCHED_MARKER,))
    return _kind("forge-unknown", ("modules_forge",))


def webui_root() -> Path | None:
    """The running WebUI's folder (with launch.py): where its `modules_forge` / `modules` packages live."""
    for package in ("modules_forge", "modules"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in list(getattr(spec, "submodule_search_locations", None) or []) if spec else []:
            root = Path(location).resolve().parent
            if (root / "launch.py").is_file():
                return root
    return None


_detected: ForgeKind | None = None


def detect(*, forge: bool = False) -> ForgeKind:
    """The kind of the running WebUI (cached). No WebUI folder found: A1111, or with `forge=True` (the
    caller knows `modules_forge` is importable) an unrecognised Forge."""
    global _detected
    if _detected is None:
        root = webui_root()
        _detected = detect_tree(root) if root is not None else None
    if _detected is None or (forge and not _detected.is_forge):
        return _kind("forge-unknown" if forge else "a1111")
    return _detected
