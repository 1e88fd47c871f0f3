"""LoRA adapters on a ModelBundle, injected with peft, exported and imported in kohya's format.

peft wraps each target module in a LoraLayer whose `base_layer` is the original module object;
`remove()` puts those objects back, so base weights (which may alias the WebUI's tensors) are
never copied or touched. Adapter math equals kohya's `LoRAModule`: `up(down(x)) * alpha / rank`,
down = kaiming-uniform(a=sqrt(5)), up = zeros.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.bundle import Family, ModelBundle
from ..models.unet_keys import to_ldm_module_name
from .errors import LoraFileError
from .kohya_file import family_from_shapes, load_kohya_file, save_kohya
from .targets import LoraTarget, find_targets, text_encoder_components

log = logging.getLogger(__name__)

ADAPTER = "kohya"
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


@dataclass
class LoraSpec:
    """What to train. alpha=None/0 means alpha=rank (kohya); conv_alpha defaults to 1 like kohya's."""

    rank: int
    alpha: float | None
    conv_rank: int | None = None  # LoCon on ResNet/Down/Upsample 3x3 convs when set
    conv_alpha: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True  # CLIP text encoder(s); Flux: CLIP-L
    dropout: float = 0.0  # peft lora_dropout: on the adapter's input (kohya's network_dropout is on the rank features)
    # kohya name -> rank, for files trained with per-block ranks (kohya's block_dims); else None
    module_ranks: dict[str, int] | None = None
    train_t5: bool = False  # Flux: adapters on T5-XXL too (kohya's network_args train_t5xxl=True)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    @property
    def effective_conv_alpha(self) -> float:
        return 1.0 if self.conv_alpha is None else float(self.conv_alpha) or float(self.conv_rank or 1)

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"LoRA rank {self.rank} is below 1; use a rank of 1 or more (4-32 is typical).")
        if self.conv_rank is not None and int(self.conv_rank) < 1:
            raise ConfigError(f"LoCon conv rank {self.conv_rank} is below 1; use 1 or more, or leave it empty "
                              "to train without LoCon.")
        if any(int(r) < 1 for r in (self.module_ranks or {}).values()):
            raise ConfigError("A per-module LoRA rank is below 1; use ranks of 1 or more.")
        if not (self.train_unet or self.train_text_encoder or self.train_t5):
            raise ConfigError("Neither the UNet nor the text encoder is set to train; enable at least one.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRA dropout {self.dropout} is outside [0, 1); use a value such as 0 or 0.1.")

    @classmethod
    def from_kohya_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> LoraSpec:
        """The spec that recreates a kohya file's network (to continue training from it).

        The most common linear and conv ranks/alphas become rank/alpha and conv_rank/conv_alpha;
        modules with other ranks (kohya's block_dims) go to `module_ranks`. Per-module alphas
        are read by `load_kohya_state_dict`.
        """
        ranks: dict[str, int] = {}
        kinds: dict[bool, Counter] = {False: Counter(), True: Counter()}  # keyed by "is a kxk conv"
        alphas: dict[bool, Counter] = {False: Counter(), True: Counter()}
        for key, value in state_dict.items():
            name, _, suffix = key.partition(".")
            if suffix != DOWN:
                continue
            is_conv = value.dim() == 4 and tuple(value.shape[2:]) != (1, 1)
            ranks[name] = int(value.shape[0])
            kinds[is_conv][ranks[name]] += 1
            alpha = state_dict.get(f"{name}.{ALPHA}")
            alphas[is_conv][float(alpha.item()) if alpha is not None else float(value.shape[0])] += 1
        if not ranks:
            raise LoraFileError("The file holds no kohya LoRA weights (no '.lora_down.weight' keys); "
                                "pick a LoRA made by kohya sd-scripts or this trainer.")
        main = not kinds[False]  # True only for a file with nothing but kxk convs
        rank = kinds[main].most_common(1)[0][0]
        conv_rank = kinds[True].most_common(1)[0][0] if kinds[True] else None
        conv_names = {k.partition(".")[0] for k, v in state_dict.items()
                      if k.endswith(DOWN) and v.dim() == 4 and tuple(v.shape[2:]) != (1, 1)}
        odd = {n: r for n, r in ranks.items() if r != (conv_rank if n in conv_names else rank)}
        return cls(rank=rank, alpha=alphas[main].most_common(1)[0][0], conv_rank=conv_rank,
                   conv_alpha=alphas[True].most_common(1)[0][0] if alphas[True] else None,
                   train_unet=any(n.startswith("lora_unet_") for n in ranks),
                   train_text_encoder=any(n.startswith("lora_te") and not n.startswith("lora_te3_") for n in ranks),
                   module_ranks=odd or None, train_t5=any(n.startswith("lora_te3_") for n in ranks))


@dataclass
class LoadReport:
    """What `load_kohya_state_dict` matched. Names are kohya module names (no suffix)."""

    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in the file, not in this network
    missing: list[str] = field(default_factory=list)  # in this network, not in the file
    unexpected_keys: list[str] = field(default_factory=list)  # full keys we could not use

    @property
    def complete(self) -> bool:
        return not (self.unexpected or self.missing or self.unexpected_keys)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} modules"]
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file but not in the model "
                         f"(e.g. {', '.join(self.unexpected[:3])})")
        if self.missing:
            parts.append(f"{len(self.missing)} in the model but not in the file (e.g. {', '.join(self.missing[:3])})")
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} unusable keys (e.g. {', '.join(self.unexpected_keys[:3])})")
        return "; ".join(parts)


def _lora_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


_ROOT = "root"  # peft sees each component as child `root` of a bare wrapper module


def _peft_config(spec: LoraSpec, targets: list[LoraTarget], ranks: dict[str, int]):
    """LoraConfig with exact module names. Names are `root.<path>` (see `_Wrapper`) so that rank
    patterns can be full paths under both peft 0.13 (`.*\\.{key}$`) and >= 0.14 (`(.*\\.)?({key})$`)."""
    from peft import LoraConfig

    by_rank: dict[int, list[str]] = {}
    for t in targets:
        if ranks[t.kohya_name] != int(spec.rank):
            by_rank.setdefault(ranks[t.kohya_name], []).append(re.escape(t.module_name))
    rank_pattern = {"(?:" + "|".join(names) + ")": r for r, names in by_rank.items()}
    return LoraConfig(
        r=int(spec.rank),
        lora_alpha=spec.effective_alpha,
        # One anchored regex (peft fullmatches a str) instead of a list, which peft checks name by
        # name against every module: quadratic, seconds for SDXL.
        target_modules=f"{_ROOT}\\.(?:" + "|".join(re.escape(t.module_name) for t in targets) + ")",
        lora_dropout=float(spec.dropout),
        bias="none",
        init_lora_weights=True,
        rank_pattern=rank_pattern,
    )


class _Wrapper(torch.nn.Module):
    """Holds a component for peft: peft's attributes (`peft_config`) land here, not on the
    component, and every module path gets a leading `root.`."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.add_module(_ROOT, root)


def _get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _adapter_home(layer: torch.nn.Module, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Where peft puts an adapter: on its base weight's device, in `dtype` or else the base weight's
    floating dtype (peft's `_move_adapter_to_device_of_base_layer`); fp32 on the CPU without a weight."""
    base = layer.get_base_layer()
    for name in ("weight", "qweight"):
        weight = getattr(base, name, None)
        if weight is not None:
            floating = weight.dtype.is_floating_point or weight.dtype.is_complex
            return weight.device, dtype or (weight.dtype if floating else torch.float32)
    return torch.device("cpu"), dtype or torch.float32


class LoraNetwork:
    """The adapters injected into one bundle. Create with `inject_lora`."""

    def __init__(self, bundle: ModelBundle, spec: LoraSpec, targets: list[LoraTarget]):
        self.bundle = bundle
        self.spec = spec
        self.targets = targets
        self.roots: dict[str, torch.nn.Module] = {"unet": bundle.unet, **dict(text_encoder_components(bundle))}
        self.layers: dict[str, torch.nn.Module] = {}  # kohya name -> peft LoraLayer wrapper
        self.alphas: dict[str, float] = {}  # kohya name -> alpha (scale = alpha / rank)
        self._by_name = {t.kohya_name: t for t in targets}
        self._saved_grad: dict[str, list[tuple[torch.nn.Parameter, bool]]] = {}
        self._saved_attrs: dict[str, set[str]] = {}
        self.removed = False

    # -- building ---------------------------------------------------------------------------
    def _inject(self, seed: int | None, dtype: torch.dtype | None) -> None:
        from peft import inject_adapter_in_model

        components = sorted({t.component for t in self.targets}, key=list(self.roots).index)
        for component in components:
            root = self.roots[component]
            targets = [t for t in self.targets if t.component == component]
            # peft freezes every non-LoRA parameter and adds attributes; remember both for remove().
            self._saved_grad[component] = [(p, p.requires_grad) for p in root.parameters()]
            self._saved_attrs[component] = set(vars(root))
            ranks = {t.kohya_name: self.expected_rank(t) for t in targets}
            # Adapters are built on the meta device (this thread only) and placed below: peft's own
            # init and its moves to the base's device and dtype would all be redone anyway (SDXL:
            # 722 modules, 3 of 4 random draws and every copy saved).
            with torch.device("meta"):
                inject_adapter_in_model(_peft_config(self.spec, targets, ranks), _Wrapper(root),
                                        adapter_name=ADAPTER)
            for t in targets:
                self.layers[t.kohya_name] = _get_module(root, t.module_name)

        lora_layer = _lora_layer_cls()
        # Drawn on the CPU from our own generator, then copied: the same seed gives the same
        # adapters on any device, and the global (CUDA) RNG state is left alone.
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for t in self.targets:
                layer = self.layers[t.kohya_name]
                rank = self.expected_rank(t)
                if not isinstance(layer, lora_layer) or layer.r.get(ADAPTER) != rank:
                    raise RuntimeError(f"peft did not wrap {t.component}.{t.module_name} with rank {rank}")
                down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
                device, adapter_dtype = _adapter_home(layer, dtype)
                for part in (down, up):
                    part.to_empty(device=device)
                    part.to(dtype=adapter_dtype)
                # kohya's init (kaiming_uniform a=sqrt(5) = U(+-1/sqrt(fan_in)); up = 0), in kohya's
                # module order, independent of peft's version.
                if not down.weight.is_meta:
                    bound = 1.0 / math.sqrt(down.weight[0].numel())
                    w = torch.empty(down.weight.shape).uniform_(-bound, bound, generator=gen)
                    down.weight.copy_(w)
                    up.weight.zero_()
                self._set_alpha(t, self.expected_alpha(t))

    def expected_rank(self, target: LoraTarget) -> int:
        if self.spec.module_ranks and target.kohya_name in self.spec.module_ranks:
            return int(self.spec.module_ranks[target.kohya_name])
        return int(self.spec.conv_rank) if target.is_conv3x3 else int(self.spec.rank)

    def expected_alpha(self, target: LoraTarget) -> float:
        return self.spec.effective_conv_alpha if target.is_conv3x3 else self.spec.effective_alpha

    def _set_alpha(self, target: LoraTarget, alpha: float) -> None:
        layer = self.layers[target.kohya_name]
        layer.lora_alpha[ADAPTER] = alpha
        layer.scaling[ADAPTER] = alpha / layer.r[ADAPTER]
        self.alphas[target.kohya_name] = alpha

    # -- training ---------------------------------------------------------------------------
    def parameters(self, component: str | None = None) -> Iterator[torch.nn.Parameter]:
        """LoRA parameters: all, or of "unet", "te" (every text encoder), "te1", "te2"."""
        for t in self.targets:
            if component is None or t.component == component or (component == "te" and t.component.startswith("te")):
                layer = self.layers[t.kohya_name]
                yield layer.lora_A[ADAPTER].weight
                yield layer.lora_B[ADAPTER].weight

    def components(self) -> list[str]:
        return sorted({t.component for t in self.targets}, key=list(self.roots).index)

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's output (1.0 = as trained, 0.0 = base model), like kohya's multiplier."""
        for t in self.targets:
            layer = self.layers[t.kohya_name]
            layer.scaling[ADAPTER] = multiplier * self.alphas[t.kohya_name] / layer.r[ADAPTER]

    # -- kohya format -----------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
        """Tensors exactly as kohya's `LoRANetwork.save_weights` writes them (CPU copies)."""
        out: dict[str, torch.Tensor] = {}
        for t in self.targets:
            layer = self.layers[t.kohya_name]
            down = layer.lora_A[ADAPTER].weight.detach()
            up = layer.lora_B[ADAPTER].weight.detach()
            alpha = torch.tensor(self.alphas[t.kohya_name])  # 0-dim, like kohya's `alpha` buffer
            for suffix, value in ((ALPHA, alpha), (DOWN, down), (UP, up)):
                # meta tensors (models built without weights, for shape checks) stay on meta
                device = "meta" if down.is_meta else "cpu"
                value = value.to(device=device, dtype=dtype or value.dtype, copy=True)
                out[f"{t.kohya_name}.{suffix}"] = value.contiguous()
        return out

    def _aliases(self) -> dict[str, LoraTarget]:
        """kohya names we accept: ours, plus the other UNet naming (diffusers vs SGM) that others write."""
        names = dict(self._by_name)
        if getattr(self.bundle, "is_flux", False):
            return names  # kohya, ComfyUI and Forge all name Flux modules by the BFL layout
        cfg = self.bundle.unet.config
        for t in self.targets:
            if t.component != "unet":
                continue
            path = t.module_name if self.bundle.is_sdxl else to_ldm_module_name(t.module_name, cfg)
            names.setdefault(f"lora_unet_{path.replace('.', '_')}", t)
        return names

    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = False) -> LoadReport:
        """Copy a kohya LoRA's weights and alphas into the adapters.

        Shapes must match (build the network with `LoraSpec.from_kohya_state_dict` for a foreign
        file). Modules the file has but the network lacks, or the reverse, are reported; with
        strict=True they raise LoraFileError.
        """
        file_family = family_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
        model_family = Family(self.bundle.family)
        if file_family is not None and file_family.is_flux and model_family.is_flux:
            file_family = model_family  # Flux.1 LoRAs load on Flux-derived models, as in ComfyUI and Forge
        if file_family is not None and file_family is not model_family:
            raise LoraFileError(f"The LoRA is for {file_family.label} but the model is {self.bundle.family.label}; "
                                f"pick a {self.bundle.family.label} LoRA or load a {file_family.label} model.")
        aliases = self._aliases()
        groups: dict[str, dict[str, torch.Tensor]] = {}
        report = LoadReport()
        for key, value in state_dict.items():
            name, _, suffix = key.partition(".")
            if suffix in (DOWN, UP, ALPHA):
                groups.setdefault(name, {})[suffix] = value
            else:
                report.unexpected_keys.append(key)
        seen: set[str] = set()
        with torch.no_grad():
            for name, parts in groups.items():
                target = aliases.get(name)
                if target is None:
                    report.unexpected.append(name)
                    continue
                if DOWN not in parts or UP not in parts:
                    report.unexpected_keys += [f"{name}.{s}" for s in parts]
                    continue
                layer = self.layers[target.kohya_name]
                down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if tuple(parts[DOWN].shape) != tuple(down.shape) or tuple(parts[UP].shape) != tuple(up.shape):
                    raise LoraFileError(
                        f"The LoRA file's module {name} has shapes {tuple(parts[DOWN].shape)}/"
                        f"{tuple(parts[UP].shape)} but this model expects {tuple(down.shape)}/{tuple(up.shape)}; "
                        "use a LoRA made for this model family and build the network with the file's rank "
                        "(LoraSpec.from_kohya_state_dict).")
                down.copy_(parts[DOWN].to(device=down.device, dtype=down.dtype))
                up.copy_(parts[UP].to(device=up.device, dtype=up.dtype))
                alpha = parts.get(ALPHA)
                # kohya: a module without `alpha` has alpha = rank (scale 1).
                self._set_alpha(target, float(alpha.item()) if alpha is not None else float(down.shape[0]))
                seen.add(target.kohya_name)
                report.loaded.append(name)
        report.missing = [t.kohya_name for t in self.targets if t.kohya_name not in seen]
        if not report.complete:
            log.warning("LoRA import: %s", report.summary())
            if strict:
                raise LoraFileError(f"The LoRA file does not match this model ({report.summary()}); "
                                    "pick a LoRA of the same family and settings, or load it non-strictly.")
        return report

    def load_file(self, path, strict: bool = False) -> LoadReport:
        """`load_kohya_state_dict` of a LoRA file (.safetensors or torch-saved)."""
        return self.load_kohya_state_dict(load_kohya_file(path)[0], strict=strict)

    def save_kohya(self, path, metadata: Mapping[str, str] | None = None,
                   dtype: torch.dtype = torch.float16) -> str:
        """Write a kohya LoRA file (atomic, with sshs_* hashes). Returns the path."""
        return save_kohya(path, self.kohya_state_dict(dtype), metadata or {})

    # -- teardown ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Unwrap every adapter: the base modules go back exactly as they were (same objects)."""
        if self.removed:
            return
        for t in self.targets:
            root = self.roots[t.component]
            parent_path, _, child = t.module_name.rpartition(".")
            parent = _get_module(root, parent_path) if parent_path else root
            wrapper = getattr(parent, child)
            if wrapper is self.layers[t.kohya_name]:
                setattr(parent, child, wrapper.base_layer)
        for component, saved in self._saved_grad.items():
            for p, flag in saved:
                p.requires_grad_(flag)
            root = self.roots[component]
            for attr in set(vars(root)) - self._saved_attrs[component]:
                delattr(root, attr)
        self.removed = True


def inject_lora(bundle: ModelBundle, spec: LoraSpec, seed: int | None = None,
                dtype: torch.dtype | None = torch.float32) -> LoraNetwork:
    """Wrap the bundle's UNet/text-encoder modules with peft LoRA adapters (kohya's target set).

    seed makes the initial lora_down weights reproducible; dtype is the adapters' dtype (fp32,
    as kohya trains them, whatever the base weights are; None keeps peft's choice).
    """
    spec.validate()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, root in (("unet", bundle.unet), *text_encoder_components(bundle)):
        if any(isinstance(m, BaseTunerLayer) for m in root.modules()):
            raise ConfigError(f"The model's {component} already carries LoRA adapters; remove them "
                              "(LoraNetwork.remove()) before adding new ones.")
    targets = find_targets(bundle, unet=spec.train_unet, text_encoder=spec.train_text_encoder,
                           conv=spec.conv_rank is not None, t5=spec.train_t5)
    if not targets:
        raise ConfigError("The model has no modules LoRA can train; load an SD1, SD2, SDXL or Flux.1 model.")
    network = LoraNetwork(bundle, spec, targets)
    network._inject(seed, dtype)
    return network



@contextmanager
def applied_lora(bundle: ModelBundle, path: str | Path | None) -> Iterator[LoraNetwork | None]:
    """The kohya LoRA file at `path` loaded onto the bundle for the `with` block, removed after
    (None: the bundle as it is), e.g. for A/B pictures with and without a trained LoRA."""
    if path is None:
        yield None
        return
    tensors, _ = load_kohya_file(path)
    network = inject_lora(bundle, LoraSpec.from_kohya_state_dict(tensors))
    try:
        network.load_kohya_state_dict(tensors, strict=True)
        yield network
    finally:
        network.remove()
