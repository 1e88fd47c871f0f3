"""Bytes a step of Python code newly allocates and keeps alive in torch tensors, on any device (issue 18): the
measure of bench/flux_forge_handoff.py's hand-off (`handoff_new_bytes`) and of tests/test_webui_forge_flux.py.

`live_storages()` is every tensor storage Python can reach after `gc.collect()` (`gc.get_objects()`: tensors held
by modules, wrapper objects such as quant.FrozenWeight, closures, lists...), keyed by (device, data_ptr) and
keeping one tensor of each alive. `new_storages(before, after)` are the storages of `after` not alive in `before`:
holding `before` keeps their addresses from being reused, so a storage counts once (views and aliases share its
key) and exactly (`untyped_storage().nbytes()`). `name_storages` names them by walking modules' parameters,
buffers, tensor attributes and QuantLinear weights. What this cannot see: tensors held only by C++ (an autograd
graph's saved tensors, a CUDA graph's pool) and the caching allocator's rounding (CUDA's memory_allocated does).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

Key = tuple[str, int]


def _key(t: torch.Tensor) -> tuple[Key, int] | None:
    try:
        if t.is_meta or t.layout != torch.strided:
            return None
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. a functional or sparse tensor)
        return None
    return ((str(t.device), ptr), nbytes) if ptr else None


def live_storages() -> dict[Key, tuple[int, torch.Tensor]]:
    """{(device, data_ptr): (storage bytes, a tensor on it)} for every storage Python can reach."""
    gc.collect()
    out: dict[Key, tuple[int, torch.Tensor]] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookups (weak proxies, lazy modules)
            continue
        k = _key(obj)
        if k is not None and k[0] not in out:
            out[k[0]] = (k[1], obj)
    return out


def new_storages(before: dict, after: dict) -> dict[Key, tuple[int, torch.Tensor]]:
    return {k: v for k, v in after.items() if k not in before}


def _tensors_of(obj: Any, prefix: str):
    """(name, tensor) for the tensors an object holds in its attributes (and one level of lists of them)."""
    for attr, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}.{attr}", value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{prefix}.{attr}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor))


def name_storages(roots: dict[str, nn.Module]) -> dict[Key, str]:
    """{storage key: the first name of a tensor on it} over the modules' parameters, buffers, tensor attributes
    and the tensors of their `frozen` weights (quant.QuantLinear), with those objects' own tensor attributes."""
    names: dict[Key, str] = {}

    def add(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor) and (k := _key(t)) is not None:
            names.setdefault(k[0], name)

    for root_name, root in roots.items():
        for mod_name, module in root.named_modules():
            where = f"{root_name}.{mod_name}" if mod_name else root_name
            for attr, t in (*module._parameters.items(), *module._buffers.items()):
                add(f"{where}.{attr}", t)
            for name, t in _tensors_of(module, where):
                add(name, t)
            frozen = getattr(module, "frozen", None)
            if frozen is not None:
                for i, t in enumerate(frozen.storage()):
                    add(f"{where}.frozen.storage[{i}]", t)
                for name, t in _tensors_of(frozen, f"{where}.frozen"):
                    add(name, t)
    return names


def summary(new: dict[Key, tuple[int, torch.Tensor]], names: dict[Key, str], top: int = 3) -> dict:
    """Total new bytes, count, bytes by device and by root module (the first part of the name; "other" for
    unnamed storages), and each root's `top` largest new storages (name, shape, dtype, device, bytes)."""
    by_device: dict[str, int] = {}
    by_root: dict[str, list] = {}
    for k, (nbytes, t) in sorted(new.items(), key=lambda kv: kv[1][0], reverse=True):
        by_device[k[0]] = by_device.get(k[0], 0) + nbytes
        root = names[k].split(".", 1)[0] if k in names else "other"
        by_root.setdefault(root, []).append((names.get(k, "(not in the trainer's modules)"), nbytes, t))
    return {"new_bytes": sum(n for n, _ in new.values()), "new_storages": len(new),
            "new_bytes_named": sum(nbytes for k, (nbytes, _) in new.items() if k in names),
            "new_bytes_by_device": by_device,
            "new_bytes_by_root": {root: sum(n for _, n, _ in items) for root, items in by_root.items()},
            "top": {root: [{"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                            "device": str(t.device), "bytes": nbytes} for name, nbytes, t in items[:top]]
                    for root, items in by_root.items()}}


def self_check() -> bool:
    """The measure counts tensors held only inside our wrapper objects (a QuantLinear over a PlainWeight, a
    HostWeight's `extra`), each storage once however many views of it there are, and none of the old ones."""
    from lora_trainer import quant

    old = torch.zeros(1024, 256)  # alive before: a view of it made after must not count
    before = live_storages()
    plain = torch.ones(512, 256)  # 512 KiB
    extra = torch.ones(128, 256, dtype=torch.float16)  # 64 KiB
    layer = quant.QuantLinear(quant.PlainWeight(plain), None, dtype=torch.float32)
    host = quant.HostWeight(lambda: old, shape=old.shape, format="fp32", extra=[extra[:10], extra])
    views = [plain[1:], old[3:]]
    del plain, extra
    new = new_storages(before, live_storages())
    names = name_storages({"layer": layer})
    want = 512 * 256 * 4 + 128 * 256 * 2 + layer._anchor.untyped_storage().nbytes()
    ok = (sum(n for n, _ in new.values()) == want and len(new) == 3
          and sum(1 for k in new if k in names) == 2)  # the plain weight and the anchor: the extra is the host's
    del layer, host, views, before
    return ok
