"""How a Forge-family WebUI (Forge 2.x, Neo, ersatzForge) stores the weights it has loaded.

Forge's "Diffusion in Low Bits" and pre-quantised files leave no exact fp16/bf16/fp32 tensor in
memory for some layers: fp8 (plain or "fp8_scaled", a per-layer `scale_weight`), int8 with a
`weight_scale` (Neo), bitsandbytes nf4/fp4 (`Params4bit`, `bnb_quantized`), GGUF
(`ParameterGGUF.gguf_cls`) and Nunchaku SVDQ modules (Neo, Flux-family only). LoRA Trainer trains
in place only on plain floating-point storage; `probe()` says which format each part is in, so the
caller can fall back to the checkpoint file and say why. Reads attributes only (no `backend.*`
import): the tests drive it with stand-ins, and the Flux hand-off (webui/forge_flux.py) reuses it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLAIN_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tensor_format(t: torch.Tensor, owner: torch.nn.Module | None = None) -> str:
    """How `t` is stored: fp32/fp16/bf16 (+ " scaled"), fp8 e4m3fn/e5m2, fp8_scaled, int8, nf4, fp4, gguf Q4_K, ..."""
    gguf = getattr(t, "gguf_cls", None)
    if gguf is not None:
        return f"gguf {getattr(gguf, '__name__', '')}".strip()
    if hasattr(t, "bnb_quantized") or hasattr(t, "quant_state"):
        return str(getattr(t, "quant_type", None) or "nf4/fp4")
    if t.dtype in PLAIN_FORMATS:
        # Forge multiplies any weight by its layer's `scale_weight`: an fp8_scaled file loaded into fp16/fp32
        # storage (Forge main on the CPU) holds scaled values, not the weights themselves.
        scaled = owner is not None and getattr(owner, "scale_weight", None) is not None
        return PLAIN_FORMATS[t.dtype] + (" scaled" if scaled else "")
    if t.dtype == torch.int8 and owner is not None and getattr(owner, "weight_scale", None) is not None:
        return "int8"  # Neo's int8 layers: weight + per-tensor/row weight_scale
    name = str(t.dtype).replace("torch.", "")
    if name.startswith("float8"):
        scaled = owner is not None and getattr(owner, "scale_weight", None) is not None
        return "fp8_scaled" if scaled else "fp8 " + name.removeprefix("float8_")
    return name  # int8, uint8 (packed 4-bit), ...


def is_trainable(fmt: str) -> bool:
    return fmt in PLAIN_FORMATS.values()


@dataclass
class StorageReport:
    """Formats of one model's parts: {"UNet": Counter({"fp16": 686}), ...} by weight count."""

    parts: dict[str, Counter] = field(default_factory=dict)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # (part, format) -> first weight name

    @property
    def low_bit(self) -> list[tuple[str, str, str]]:
        """(part, format, example weight) for every storage format we cannot train in place."""
        return [(part, fmt, self.examples[(part, fmt)]) for part, counts in self.parts.items()
                for fmt in counts if not is_trainable(fmt)]

    @property
    def trainable_in_place(self) -> bool:
        return not self.low_bit

    def describe(self) -> str:
        """e.g. "UNet: fp8 e4m3fn (686 weights); text encoder: fp16; VAE: fp32"."""
        out = []
        for part, counts in self.parts.items():
            formats = ", ".join(f if len(counts) == 1 else f"{f} ({n} weights)" for f, n in counts.most_common())
            out.append(f"{part}: {formats or 'no weights'}")
        return "; ".join(out)

    def low_bit_text(self) -> str:
        """e.g. "UNet in fp8 e4m3fn (input_blocks.1.1.proj_in.weight)"."""
        return ", ".join(f"{part} in {fmt} ({name})" for part, fmt, name in self.low_bit)


SCALE_NAMES = ("scale_weight", "weight_scale", "scale_input", "input_scale")  # fp8_scaled / int8 scales
SVDQ = "svdq (Nunchaku)"


def probe_module(module: torch.nn.Module) -> tuple[Counter, dict[str, str]]:
    """({format: number of weights}, {format: first weight name}) for one module tree."""
    counts: Counter = Counter()
    first: dict[str, str] = {}
    svdq: list[str] = []  # Nunchaku modules: packed 4-bit + low-rank, counted once, children skipped

    def add(fmt: str, name: str) -> None:
        counts[fmt] += 1
        first.setdefault(fmt, name)

    for mod_name, mod in module.named_modules():
        if any(mod_name == s or mod_name.startswith(s + ".") or s == "" for s in svdq):
            continue
        if "svdq" in type(mod).__name__.lower():
            svdq.append(mod_name)
            add(SVDQ, mod_name or type(mod).__name__)
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p_name not in SCALE_NAMES:
                add(tensor_format(p, mod), f"{mod_name}.{p_name}" if mod_name else p_name)
    return counts, first


def probe(parts: dict[str, torch.nn.Module], *, unet_storage: object = None) -> StorageReport:
    """Formats of every part (`{"UNet": module, ...}`).

    `unet_storage`: Forge's `storage_dtype` for the UNet; a low-bit one counts even when no weight
    shows it (bitsandbytes converts its weights only when they first reach the GPU).
    """
    report = StorageReport()
    for part, module in parts.items():
        counts, first = probe_module(module)
        if part == "UNet" and unet_storage is not None and unet_storage not in TRAINABLE_DTYPES:
            fmt = (tensor_format(torch.empty(0, dtype=unet_storage)) if isinstance(unet_storage, torch.dtype)
                   else str(unet_storage))
            if not any(not is_trainable(f) for f in counts):
                counts[fmt] += 1
                first.setdefault(fmt, "(the UNet's storage_dtype)")
        report.parts[part] = counts
        report.examples.update({(part, f): n for f, n in first.items()})
    return report


def forge_parts(sd_model: object) -> dict[str, torch.nn.Module]:
    """The UNet/transformer, text encoders and VAE of a Forge 2.x-style `sd_model` (forge_objects_original)."""
    fo = sd_model.forge_objects_original  # type: ignore[attr-defined]
    return {"UNet": fo.unet.model.diffusion_model, "text encoder": fo.clip.cond_stage_model,
            "VAE": fo.vae.first_stage_model}


def probe_forge_model(sd_model: object) -> StorageReport:
    fo = sd_model.forge_objects_original  # type: ignore[attr-defined]
    return probe(forge_parts(sd_model), unet_storage=getattr(fo.unet.model, "storage_dtype", None))
