"""Shared by the tab's Gradio tests (test_ui.py, test_ui_form.py): a browser-like `Session` over the real Blocks,
the `photos` fixture and a tiny standalone host. Import it after `pytest.importorskip("gradio")`."""

from __future__ import annotations

import time
import types

import gradio as gr
import pytest
from PIL import Image
from train_support import shape_image

from lora_trainer.host import StandaloneHost
from lora_trainer.models.tiny import build_tiny_bundle

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
# No bucket settings: at 64 px the buckets follow the resolution (issue: "below min_bucket_reso 256")
TINY_EXTRA = '{"save_precision": "float", "sample_steps": 2}'


class Session:
    """A browser session: component values by id; firing an event runs its handler (and `.then`s)."""

    def __init__(self, tab):
        self.tab = tab
        self.deps = tab.get_config_file()["dependencies"]
        self.values = {bid: getattr(b, "value", None) for bid, b in tab.blocks.items()}
        self.props = {}  # last gr.update() properties (label, visible, choices) per block id
        self.by_elem = {b.elem_id: bid for bid, b in tab.blocks.items() if getattr(b, "elem_id", None)}

    def id(self, elem_id):
        return self.by_elem[elem_id]

    def __getitem__(self, elem_id):
        return self.values[self.id(elem_id)]

    def __setitem__(self, elem_id, value):
        self.values[self.id(elem_id)] = value

    def prop(self, elem_id, name):
        bid = self.id(elem_id)
        if name in self.props.get(bid, {}):
            return self.props[bid][name]
        return getattr(self.tab.blocks[bid], name, None)

    def _dep_index(self, block_id, event):
        for i, dep in enumerate(self.deps):
            for t in dep["targets"]:
                if (t == [block_id, event] or t == (block_id, event)
                        or (t == block_id and dep.get("trigger") == event)):
                    return i
        raise AssertionError(f"no {event} handler on block {block_id}")

    def _fn(self, i):
        dep = self.deps[i]
        return self.tab.fns[dep["id"]] if GRADIO4 else self.tab.fns[i]

    def _apply(self, outputs, result):
        if len(outputs) == 1:
            result = (result,)
        for oid, value in zip(outputs, result):
            if isinstance(value, dict) and str(value.get("__type__", "")).endswith("update"):
                self.props.setdefault(oid, {}).update({k: v for k, v in value.items() if k != "__type__"})
                if "value" in value:
                    self.values[oid] = value["value"]
            else:
                self.values[oid] = value

    def _run(self, i, evt=None, first_only=False):
        dep = self.deps[i]
        args = [self.values[j] for j in dep["inputs"]]
        if evt is not None:
            args.append(evt)
        fn = self._fn(i).fn
        if fn is None:  # a JS-only event
            return
        result = fn(*args)
        if isinstance(result, types.GeneratorType):
            for item in result:
                self._apply(dep["outputs"], item)
                if first_only:  # a page's poll loop never ends: take what it shows first
                    result.close()
                    break
        else:
            self._apply(dep["outputs"], result)
        key = dep.get("id", i) if GRADIO4 else i
        for j, other in enumerate(self.deps):
            if other.get("trigger_after") == key:
                self._run(j)

    def fire(self, elem_id, event="click", evt=None):
        self._run(self._dep_index(self.id(elem_id), event), evt)

    def open(self):
        """What the page shows when it is opened: its load events (the form, the run it follows)."""
        ran = 0
        for i, dep in enumerate(self.deps):
            loads = [t for t in dep["targets"] if isinstance(t, (list, tuple)) and t[1] == "load"]
            if (loads or dep.get("trigger") == "load") and dep["outputs"]:
                self._run(i, first_only=True)
                ran += 1
        assert ran >= 2, "no load events"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shape_image(i, (64, 64)).save(folder / f"s{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    return folder


def tiny_host(tmp_path, **kw):
    return StandaloneHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"), **kw)


def wait_for(predicate, timeout=30.0):
    """Until `predicate()` holds (an observable state, not a guessed delay)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def tiny_dataset(tmp_path):
    """A prepared dataset of one 8 px picture (`ds/img/2_thing`), for runs where only the job flow matters."""
    data = tmp_path / "ds" / "img" / "2_thing"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.png")
    return tmp_path / "ds"
