"""Chroma as a training family: kohya's `flux_train_network.py --model_type chroma` on our BFL-layout
`models.flux.chroma.ChromaTransformer`.

What differs from Flux.1 (`family_flux.py`, whose objective, memory plan and metadata it reuses):
- T5-XXL only (no CLIP-L, no pooled vector): conditioning is T5's last hidden state (`t5`) and the
  tokenizer's attention mask (`t5_mask`). The mask goes into T5 while encoding and into the transformer,
  which attends to each caption's tokens plus one padding token (kohya's `apply_t5_attn_mask`, which it
  requires for Chroma; diffusers' ChromaPipeline does the same).
- No distilled guidance: the modulation approximator gets guidance 0 while training (kohya:
  "--guidance_scale=0.0 is required" for Chroma); `guidance_scale` applies to FLUX.1 dev only.
- Samples use classifier-free guidance with the negative prompt (`sample_cfg_scale`, kohya's `--l 4.0`)
  and the resolution-shifted schedule.
- `train_text_encoder` (CLIP-L) does not apply; T5 trains only with `train_t5`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .family import Batch, register
from .family_flux import FluxFamily, _device, _fingerprint


class ChromaFamily(FluxFamily):
    key = "chroma"
    cond_keys = ("t5", "t5_mask")
    model_type = "chroma"
    t5_attention_mask = True

    # ---------------------------------------------------------------- text
    def tokenize(self, bundle: Any, captions: list[str], keys: Sequence[str] | None = None) -> Batch:
        t5 = bundle.tokenizers[-1](captions, max_length=self._t5_length(bundle, self.config), padding="max_length",
                                   truncation=True, return_tensors="pt")
        return {"t5_ids": t5.input_ids, "t5_mask": t5.attention_mask}

    def encode_tokens(self, bundle: Any, tokens: Batch, *, clip_skip: int = 1) -> Batch:
        t5 = bundle.text_encoders[-1]
        device = _device(t5)
        mask = tokens["t5_mask"].to(device)
        trains_t5 = any(p.requires_grad for p in t5.parameters())
        with torch.enable_grad() if trains_t5 and torch.is_grad_enabled() else torch.no_grad():
            hidden = t5(tokens["t5_ids"].to(device), attention_mask=mask).last_hidden_state
        return {"t5": hidden, "t5_mask": mask}

    def cacheable_cond_keys(self, config: Any) -> tuple[str, ...]:
        return () if getattr(config, "train_t5", False) else self.cond_keys

    def encoders_for(self, bundle: Any, keys: Sequence[str]) -> list[torch.nn.Module]:
        return list(bundle.text_encoders)

    def text_identity(self, bundle: Any, clip_skip: int = 1, keys: Sequence[str] | None = None) -> str | None:
        h = hashlib.sha256(b"chroma-text-v1")  # masked T5: not interchangeable with Flux.1's unmasked entries
        h.update(str(self._t5_length(bundle, self.config)).encode())
        for te in bundle.text_encoders:
            _fingerprint(te, h)
        return h.hexdigest()[:24]

    # ---------------------------------------------------------------- config, the model call
    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if config.train_text_encoder:
            raise ConfigError("Chroma has no CLIP-L text encoder to train (train_text_encoder); turn it off, or "
                              "train T5-XXL with train_t5 instead.")

    def text_inputs(self, cond: Batch, bsz: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        from ..models.flux.model import text_ids

        t5 = cond["t5"].to(device, dtype)
        return {"txt": t5, "txt_ids": text_ids(bsz, t5.shape[1], device=device), "txt_mask": cond["t5_mask"].to(device)}

    def train_guidance(self, config: Any) -> float:
        return 0.0

    # ---------------------------------------------------------------- samples
    def generate(self, bundle: Any, prompts: list[str], *, seed: int = 1234, steps: int = 20,
                 cfg_scale: float = 4.0, width: int = 1024, height: int = 1024, negative_prompt: str = "",
                 clip_skip: int = 1, on_step: Callable[[int, int], None] | None = None) -> list:
        from .flux_sampling import generate

        return generate(bundle, self, prompts, seed=seed, steps=steps, guidance=0.0, width=width, height=height,
                        cfg_scale=cfg_scale, negative_prompt=negative_prompt, on_step=on_step)


register("chroma", ChromaFamily)
