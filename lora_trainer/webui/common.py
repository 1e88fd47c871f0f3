"""What the A1111 and Forge adapters share: API auth, allowed roots, settings, install status.

No `modules.*` import at module level: everything here also runs in tests without a WebUI, given
objects shaped like the WebUI's `cmd_opts` / `opts`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..auth import basic_auth_dependency, parse_api_auth

log = logging.getLogger("lora_trainer.webui")

EXT_DIR = Path(__file__).resolve().parents[2]  # the extension folder (repository root)
INSTALL_STATUS = EXT_DIR / ".install-status.json"  # written by install.py
SETTINGS_SECTION = ("lora_trainer", "LoRA Trainer")
TAB_LABEL = "Train LoRA"
TAB_ID = "lora_trainer"


def api_auth_dependency(cmd_opts: Any) -> Callable[..., bool] | None:
    """A FastAPI dependency enforcing `--api-auth` with HTTP basic auth, as A1111's `Api.auth`;
    None when the WebUI runs without it."""
    return basic_auth_dependency(parse_api_auth(getattr(cmd_opts, "api_auth", None)))


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def listens_beyond_loopback(cmd_opts: Any) -> bool:
    """--listen/--share/--ngrok, or --server-name other than a loopback address.

    (The WebUI's own `webui_is_non_local` counts any --server-name, even 127.0.0.1, as non-local;
    the issue asks for "beyond loopback", so a loopback --server-name keeps paths unrestricted.)
    """
    if any(bool(getattr(cmd_opts, k, False)) for k in ("share", "listen", "ngrok")):
        return True
    server_name = getattr(cmd_opts, "server_name", None)
    return bool(server_name) and not _is_loopback(str(server_name))


def allowed_roots_for(cmd_opts: Any, data_dir: str | Path, extra: Iterable[str | Path] = ()) -> list[Path] | None:
    """Folders typed paths must stay inside: None (anywhere) on a loopback-only WebUI or with
    `--enable-insecure-extension-access`; else the WebUI data dir, its Lora folder and `extra`."""
    if not listens_beyond_loopback(cmd_opts) or getattr(cmd_opts, "enable_insecure_extension_access", False):
        return None
    roots = [Path(data_dir)]
    lora_dir = getattr(cmd_opts, "lora_dir", None)
    if lora_dir:
        roots.append(Path(lora_dir))
    roots.extend(Path(p) for p in extra if str(p).strip())
    return [r.expanduser().resolve() for r in roots]


def split_roots(value: Any) -> list[str]:
    """The 'extra allowed folders' setting: a list, or text with one folder per line / comma."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value or "")
    return [p.strip() for p in text.replace(",", "\n").splitlines() if p.strip()]


def settings_specs() -> list[Any]:
    from ..ui.settings import SETTINGS

    return list(SETTINGS)


def settings_from_opts(opts: Any, specs: Iterable[Any]) -> dict[str, Any]:
    """{key: value} of our settings as the WebUI has them now (defaults where unset)."""
    data = getattr(opts, "data", None)
    data = data if isinstance(data, Mapping) else {}
    return {spec.key: data.get(spec.key, getattr(opts, spec.key, spec.default)) for spec in specs}


def register_settings(shared: Any, specs: Iterable[Any]) -> None:
    """Our settings in their own section of the WebUI's Settings tab."""
    import gradio as gr

    section = SETTINGS_SECTION
    for spec in specs:
        kind = getattr(spec, "kind", "text")
        if kind == "dropdown":
            info = shared.OptionInfo(spec.default, spec.label, gr.Dropdown,
                                     {"choices": list(getattr(spec, "choices", None) or [])}, section=section)
        elif kind == "textbox-list":
            info = shared.OptionInfo(spec.default, spec.label, gr.Textbox, {"lines": 3}, section=section)
        else:
            info = shared.OptionInfo(spec.default, spec.label, section=section)
        shared.opts.add_option(spec.key, info)


def disabled_reason(status_file: Path = INSTALL_STATUS) -> str | None:
    """install.py's refusal message, if it refused on this WebUI."""
    try:
        data = json.loads(Path(status_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if data.get("ok", True) else str(data.get("message") or "install.py refused to install.")


def tensor_fingerprint(tensors: Mapping[str, Any], *, like: Mapping[str, str] | None = None) -> dict[str, str]:
    """A digest of each tensor's bytes: compare before/after a run to prove the host's weights are
    bit-identical.

    GPU tensors get two exact 64-bit sums of their 32-bit words (plain and position-weighted),
    computed on the GPU ("sum:..."): copying a 2-7 GB model to the CPU to hash it took 4-8 s before
    every run (bench/results/webui_handoff_h100.json), this takes 0.2-0.7 s. CPU tensors get sha256
    ("sha256:...", the fastest there). `like`: an earlier fingerprint; each tensor is digested the
    way it was then, wherever it lives now, so a tensor the host moved between CPU and GPU in the
    meantime still compares.
    """
    import torch

    out: dict[str, str] = {}
    pending: dict[Any, list[tuple[str, Any]]] = {}  # device -> [(name, sums)]: one copy per device
    weights: dict[Any, Any] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)  # any dtype, incl. bf16 and fp8
        earlier = like.get(name, "") if like is not None else ""
        method = earlier.split(":", 1)[0] if earlier else ("sum" if raw.device.type == "cuda" else "sha256")
        if method == "sum":
            if raw.device not in weights:
                weights[raw.device] = _chunk_weights(raw.device)
            pending.setdefault(raw.device, []).append((name, _device_checksum(raw, weights[raw.device])))
        else:
            out[name] = "sha256:" + hashlib.sha256(raw.cpu().numpy().tobytes()).hexdigest()
    for parts in pending.values():
        values = torch.stack([sums for _, sums in parts]).cpu().tolist()
        out.update({name: "sum:" + ",".join(map(str, v)) for (name, _), v in zip(parts, values)})
    return out


_CHUNK_WORDS = 1 << 22  # 4M words: bounds the int64 temporaries at 32 MB each
def _chunk_weights(device: Any) -> Any:
    """The int64 weight of each position in a chunk: distinct and scrambled (made per fingerprint
    call and dropped after it, so no VRAM stays held)."""
    import torch

    pos = torch.arange(1, _CHUNK_WORDS + 1, dtype=torch.int64, device=device)
    return pos * 2654435761 % 4294967291


def _device_checksum(raw: Any, weights: Any = None) -> Any:
    """(byte count, sum of words, position-weighted sum of words) of a 1-D uint8 tensor, on its device."""
    import torch

    n = raw.numel()
    if n % 4 or raw.storage_offset() % 4:  # odd sizes/offsets: pad a copy to whole 32-bit words
        raw = torch.cat([raw, raw.new_zeros((-n) % 4)])
    words = raw.view(torch.int32)
    if weights is None:
        weights = _chunk_weights(raw.device)
    plain = torch.zeros((), dtype=torch.int64, device=raw.device)
    weighted = torch.zeros((), dtype=torch.int64, device=raw.device)
    for k, start in enumerate(range(0, words.numel(), _CHUNK_WORDS)):
        w = words[start:start + _CHUNK_WORDS]
        chunk_sum = w.sum(dtype=torch.int64)
        plain += chunk_sum
        # weight of position i in chunk k: weights[i] + k (so equal offsets in two chunks differ)
        weighted += (w.to(torch.int64) * weights[:w.numel()]).sum() + k * chunk_sum
    return torch.stack([torch.tensor(n, dtype=torch.int64, device=raw.device), plain, weighted])
