"""Which modules get LoRA adapters, and their kohya names.

The set is kohya sd-scripts' default `networks.lora`: every Linear/Conv2d inside the UNet's
`Transformer2DModel` blocks and inside the text encoders' attention and MLP blocks; with LoCon
(`conv_dim`), also every Linear/Conv2d inside ResNet, Downsample and Upsample blocks, where only
the 3x3 convs take the conv rank (the time-embedding Linear and 1x1 shortcut take the base rank).

kohya names are `<prefix>_<module path with dots as underscores>`. SD1/SD2 UNet paths are the
diffusers ones (kohya's own SD UNet uses them); SDXL UNet paths are SGM (`input_blocks.4.1...`)
because kohya trains SDXL on its SGM-layout UNet. CLIP paths always start at `text_model.`
(transformers' CLIP layout; transformers 5 dropped that level in CLIPTextModel).

Flux (kohya's `networks.lora_flux`): every Linear inside the transformer's DoubleStreamBlock and
SingleStreamBlock (`lora_unet_double_blocks_0_img_attn_qkv`, ..., modulation Linears included), CLIP-L
as `lora_te1_...`, and T5-XXL (only on request) as `lora_te3_encoder_block_0_layer_0_SelfAttention_q`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.bundle import ModelBundle
from ..models.unet_keys import to_ldm_module_name

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
FLUX_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")
T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense")

LINEAR = "linear"
CONV1X1 = "conv1x1"
CONV = "conv"  # any other kernel size (3x3 in SD): takes conv_rank/conv_alpha


@dataclass(frozen=True)
class LoraTarget:
    """One module that gets an adapter."""

    component: str  # "unet", "te" (SD1/SD2), "te1"/"te2" (SDXL), "te1"/"te3" (Flux CLIP-L / T5)
    module_name: str  # path inside the component module, as named_modules() gives it
    kohya_name: str  # e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    kind: str  # LINEAR, CONV1X1 or CONV

    @property
    def is_conv3x3(self) -> bool:
        return self.kind == CONV


def kohya_prefix(component: str) -> str:
    return f"lora_{component}"


def _is_block(module: torch.nn.Module, class_names: tuple[str, ...]) -> bool:
    # By class name, as kohya does, but along the MRO so subclasses (CLIPSdpaAttention in
    # transformers 4.4x, CLIPFlashAttention2, ...) count too.
    return any(cls.__name__ in class_names for cls in type(module).__mro__)


def _kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return LINEAR
    if isinstance(module, torch.nn.Conv2d):
        return CONV1X1 if tuple(module.kernel_size) == (1, 1) else CONV
    return None


def _te_path(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"


def component_targets(component: str, root: torch.nn.Module, block_classes: tuple[str, ...],
                      unet_config=None, sgm_names: bool = False, clip_names: bool = True) -> list[LoraTarget]:
    """Targets inside one component, in kohya's order (named_modules of root, then of each block)."""
    prefix = kohya_prefix(component)
    targets: list[LoraTarget] = []
    seen: set[str] = set()
    for block_name, block in root.named_modules():
        if not _is_block(block, block_classes):
            continue
        for child_name, child in block.named_modules():
            kind = _kind(child)
            if kind is None:
                continue
            module_name = f"{block_name}.{child_name}" if block_name else child_name
            if module_name in seen:
                continue
            seen.add(module_name)
            if component == "unet":
                path = to_ldm_module_name(module_name, unet_config) if sgm_names else module_name
            else:
                path = _te_path(module_name) if clip_names else module_name
            targets.append(LoraTarget(component, module_name, f"{prefix}_{path.replace('.', '_')}", kind))
    return targets


def text_encoder_components(bundle: ModelBundle) -> list[tuple[str, torch.nn.Module]]:
    """(kohya component name, module) of each text encoder: te / te1, te2 / Flux te1 (CLIP-L), te3 (T5)."""
    names = bundle.text_encoder_names() if hasattr(bundle, "text_encoder_names") else (
        ["te"] if len(bundle.text_encoders) == 1 else [f"te{i}" for i in range(1, len(bundle.text_encoders) + 1)])
    return list(zip(names, bundle.text_encoders))


def _is_t5(module: torch.nn.Module) -> bool:
    return any(cls.__name__.startswith("T5") for cls in type(module).__mro__)


def find_targets(bundle: ModelBundle, *, unet: bool = True, text_encoder: bool = True,
                 conv: bool = False, t5: bool = False) -> list[LoraTarget]:
    """All adapter targets of a bundle: text encoder(s) first, then UNet/transformer, as kohya orders
    them. `t5`: also Flux's T5-XXL (kohya's `train_t5xxl`), which `text_encoder` alone leaves out."""
    targets: list[LoraTarget] = []
    for component, module in text_encoder_components(bundle):
        if _is_t5(module):
            if t5:
                targets += component_targets(component, module, T5_BLOCKS, clip_names=False)
        elif text_encoder:
            targets += component_targets(component, module, TEXT_ENCODER_BLOCKS)
    if unet and getattr(bundle, "is_flux", False):
        targets += component_targets("unet", bundle.unet, FLUX_BLOCKS)
    elif unet:
        blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
        targets += component_targets("unet", bundle.unet, blocks, unet_config=bundle.unet.config,
                                     sgm_names=bundle.is_sdxl)
    names = [t.kohya_name for t in targets]
    if len(set(names)) != len(names):  # kohya asserts this too
        raise ValueError("two LoRA targets map to the same kohya name")
    return targets
