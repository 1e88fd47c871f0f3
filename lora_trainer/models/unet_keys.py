"""Module names of the SD UNet in diffusers layout and in LDM/SGM layout (A1111, Forge, kohya SDXL).

The two layouts differ only in where blocks sit; everything inside a transformer block
(`transformer_blocks.0.attn1.to_q`, `proj_in`, `norm`, ...) has the same name in both. So the
mapping is a table of block prefixes derived from the UNet config, plus a few renamed leaves
inside resnets and downsamplers.

Both directions accept any dotted name that starts with a known block: a module name
(`down_blocks.1.attentions.0`), a parameter key (`...to_q.weight`) or a block itself.

The config may be a diffusers UNet config (`down_block_types`, `layers_per_block`, ...) or the
`params` of an LDM/SGM `unet_config`/`network_config` (`channel_mult`, `num_res_blocks`,
`attention_resolutions`, `transformer_depth`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

# resnet leaves: diffusers -> LDM
_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWNSAMPLER_LEAVES = {"conv": "op"}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What decides the block numbering: per-level resnet counts and which levels have attention."""

    layers_per_block: tuple[int, ...]  # per down level
    down_attention: tuple[bool, ...]  # per down level
    up_attention: tuple[bool, ...]  # per up level (up level 0 = deepest)
    mid_attention: bool = True

    @property
    def levels(self) -> int:
        return len(self.layers_per_block)


def unet_layout(unet_config: Mapping) -> UNetLayout:
    """Read the block layout from a diffusers UNet config or an LDM/SGM UNet `params` mapping."""
    cfg = dict(unet_config)
    if "down_block_types" in cfg:
        down = tuple(cfg["down_block_types"])
        up = tuple(cfg.get("up_block_types") or ())
        n = len(down)
        lpb = cfg.get("layers_per_block", 2)
        lpb = tuple(lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n
        down_attn = tuple("Attn" in t for t in down)
        up_attn = tuple("Attn" in t for t in up) if up else tuple(reversed(down_attn))
        mid = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        return UNetLayout(lpb, down_attn, up_attn, "Attn" in mid)
    if "channel_mult" in cfg:
        mult = tuple(cfg["channel_mult"])
        n = len(mult)
        nrb = cfg.get("num_res_blocks", 2)
        lpb = tuple(nrb) if isinstance(nrb, (list, tuple)) else (int(nrb),) * n
        resolutions = {int(r) for r in cfg.get("attention_resolutions") or ()}
        depth = cfg.get("transformer_depth", 1)
        depth = tuple(depth) if isinstance(depth, (list, tuple)) else (int(depth),) * n
        down_attn = tuple(2**i in resolutions and depth[i] > 0 for i in range(n))
        return UNetLayout(lpb, down_attn, tuple(reversed(down_attn)), True)
    raise ValueError("unet_config has neither diffusers (down_block_types) nor LDM (channel_mult) keys")


def _layout_key(unet_config: Mapping | UNetLayout) -> UNetLayout:
    return unet_config if isinstance(unet_config, UNetLayout) else unet_layout(unet_config)


@lru_cache(maxsize=32)
def _block_table(layout: UNetLayout) -> tuple[tuple[str, str, str], ...]:
    """(diffusers prefix, LDM prefix, kind) for every block; kind picks the leaf renames."""
    rows: list[tuple[str, str, str]] = []
    idx = 1
    for i in range(layout.levels):
        for j in range(layout.layers_per_block[i]):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", "resnet"))
            if layout.down_attention[i]:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", "attention"))
            idx += 1
        if i < layout.levels - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{idx}.0", "downsampler"))
            idx += 1

    rows.append(("mid_block.resnets.0", "middle_block.0", "resnet"))
    if layout.mid_attention:
        rows.append(("mid_block.attentions.0", "middle_block.1", "attention"))
        rows.append(("mid_block.resnets.1", "middle_block.2", "resnet"))
    else:
        rows.append(("mid_block.resnets.1", "middle_block.1", "resnet"))

    idx = 0
    for i in range(layout.levels):
        n_res = layout.layers_per_block[layout.levels - 1 - i] + 1
        attn = layout.up_attention[i]
        for j in range(n_res):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", "resnet"))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", "attention"))
            if j == n_res - 1 and i < layout.levels - 1:
                rows.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{idx}.{2 if attn else 1}", "upsampler"))
            idx += 1

    rows.extend((d, ldm, "plain") for d, ldm in _TOP_LEVEL.items())
    return tuple(rows)


@lru_cache(maxsize=32)
def _lookup(layout: UNetLayout, reverse: bool) -> dict[str, tuple[str, str]]:
    table = _block_table(layout)
    if reverse:
        return {ldm: (d, kind) for d, ldm, kind in table}
    return {d: (ldm, kind) for d, ldm, kind in table}


def _leaves(kind: str, reverse: bool) -> dict[str, str]:
    leaves = {"resnet": _RESNET_LEAVES, "downsampler": _DOWNSAMPLER_LEAVES}.get(kind, {})
    return {v: k for k, v in leaves.items()} if reverse else leaves


def _convert(name: str, layout: UNetLayout, reverse: bool) -> str:
    lookup = _lookup(layout, reverse)
    parts = name.split(".")
    # Longest known prefix wins (block prefixes are 2-4 components long).
    for cut in range(min(len(parts), 4), 0, -1):
        prefix = ".".join(parts[:cut])
        hit = lookup.get(prefix)
        if hit is None:
            continue
        target, kind = hit
        rest = ".".join(parts[cut:])
        if not rest:
            return target
        for src, dst in _leaves(kind, reverse).items():
            if rest == src or rest.startswith(src + "."):
                rest = dst + rest[len(src):]
                break
        return f"{target}.{rest}"
    side = "LDM" if reverse else "diffusers"
    raise KeyError(f"{name!r} is not a {side} UNet module name for this UNet config")


def to_ldm_module_name(diffusers_module_name: str, unet_config: Mapping | UNetLayout) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (KeyError if unknown)."""
    return _convert(diffusers_module_name, _layout_key(unet_config), reverse=False)


def to_diffusers_module_name(ldm_module_name: str, unet_config: Mapping | UNetLayout) -> str:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (KeyError if unknown)."""
    return _convert(ldm_module_name, _layout_key(unet_config), reverse=True)


def unet_state_dict_to_diffusers(ldm_state_dict: Mapping, unet_config: Mapping | UNetLayout,
                                 prefix: str = "") -> dict:
    """Rename LDM UNet keys (optionally under `prefix`, e.g. `model.diffusion_model.`) to diffusers.

    Values are passed through untouched (same tensor objects). Keys outside `prefix` are skipped;
    unknown keys under it raise KeyError.
    """
    layout = _layout_key(unet_config)
    out = {}
    for key, value in ldm_state_dict.items():
        if not key.startswith(prefix):
            continue
        out[_convert(key[len(prefix):], layout, reverse=True)] = value
    return out


def unet_state_dict_to_ldm(diffusers_state_dict: Mapping, unet_config: Mapping | UNetLayout,
                           prefix: str = "") -> dict:
    """Rename diffusers UNet keys to LDM keys and prepend `prefix` (same tensor objects)."""
    layout = _layout_key(unet_config)
    return {prefix + _convert(k, layout, reverse=False): v for k, v in diffusers_state_dict.items()}


def ldm_block_names(unet_config: Mapping | UNetLayout) -> Iterable[tuple[str, str]]:
    """(diffusers, LDM) name pairs of every block, for tables and tests."""
    return [(d, ldm) for d, ldm, _ in _block_table(_layout_key(unet_config))]
