"""The model zoos of diffusers and transformers imported lean: their package `__init__` runs only when asked.

`from diffusers import UNet2DConditionModel` imports `diffusers.models.unets`, whose `__init__` imports every
UNet diffusers has; its blocks import `diffusers.models.transformers`, whose `__init__` imports all ~80 transformer
models (and, through their hooks, peft); `transformers.models` builds the import structure of ~400 model folders.
A run needs a handful of those modules: the rest cost 0.7 s of the 5.4 s of CPU from a CLI run's start to its
latent caching on the development CPU with diffusers 0.42 / transformers 5, ~0.2 s with Forge's pins, nothing
measurable with A1111's (bench/results/startup_cpu_2026-12-06.md).

`lean_model_zoos()` puts a finder first on `sys.meta_path` that gives those packages (`LEAN_PACKAGES`) a loader
which creates the package module as usual (its spec, `__path__`, its place on the parent) but runs its `__init__`
only on the first name the module is asked for that it does not hold yet: `import diffusers.models.unets.unet_2d_condition`
loads that file and what it imports, nothing else; `from diffusers.models.transformers import FluxTransformer2DModel`
(a name defined by the `__init__`) runs the `__init__` then, as a normal import would have, and gets the class.
The modules, classes and weights are the libraries' own: results are unchanged. Like `hidden_imports.py`, used only
by the CLI's `train` in its own process (process-wide import state); a package already imported is left alone.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence

LEAN_PACKAGES = ("diffusers.models.unets", "diffusers.models.transformers", "diffusers.models.autoencoders",
                 "transformers.models")

_lock = threading.RLock()  # the real __init__ imports submodules: the same thread may come back while it runs


class _LeanLoader(importlib.abc.Loader):
    """Creates the package as its own loader would; runs the package's `__init__` on the first missing name."""

    def __init__(self, real: importlib.abc.Loader):
        self.real = real

    def __getattr__(self, attr: str):  # get_source, get_filename, is_package, get_resource_reader, ...
        return getattr(self.real, attr)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        name, real = module.__name__, self.real
        state = {"init": "pending"}

        def __getattr__(attr: str):  # PEP 562: called only for names the module does not hold
            if attr.startswith("__") and attr != "__all__":
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            if state["init"] == "pending" and _is_submodule(module, attr):  # `from package import submodule`
                return importlib.import_module(f"{name}.{attr}")
            with _lock:
                if state["init"] == "pending":
                    state["init"] = "running"
                    try:
                        real.exec_module(module)  # the package's own __init__, in this module
                    finally:
                        state["init"] = "done"
                elif state["init"] == "running":  # asked by the __init__ itself (`from . import x`)
                    raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            if attr in module.__dict__:
                return module.__dict__[attr]
            current = sys.modules.get(name)
            if current is not None and current is not module:  # an __init__ that put a lazy module in its place
                return getattr(current, attr)
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


def _is_submodule(package: types.ModuleType, attr: str) -> bool:
    path = getattr(package, "__path__", None)
    return bool(path) and attr.isidentifier() and importlib.machinery.PathFinder.find_spec(
        f"{package.__name__}.{attr}", list(path)) is not None


class _LeanFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names: Sequence[str]):
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None):
        if fullname not in self.names or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return None  # not a package on the file system: the import system goes on as usual
        spec.loader = _LeanLoader(spec.loader)
        return spec


def lean_model_zoos(names: Sequence[str] = LEAN_PACKAGES) -> list[str]:
    """Import `names` lean from now on in this process (those not imported yet). Returns the names taken."""
    with _lock:
        if any(isinstance(f, _LeanFinder) for f in sys.meta_path):
            return []
        taken = [n for n in names if n not in sys.modules]
        if taken:
            sys.meta_path.insert(0, _LeanFinder(taken))
        return taken


def is_lean(module: types.ModuleType) -> bool:
    """True for a package imported lean (for tests)."""
    return isinstance(getattr(module, "__loader__", None), _LeanLoader)
