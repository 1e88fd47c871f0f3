"""A small synthetic tagger in the exact WD14 interface, for the demo and for tests (no downloads).

Same contract as SmilingWolf's exports: NHWC float32 BGR 0-255 input (`input` with a dynamic
batch like the v3 taggers, or `input_1:0` with a fixed batch of 1 like the old v2 exports),
one sigmoid output per row of a real-layout `selected_tags.csv` (ratings, general tags with
kaomoji and underscores, character tags with parentheses). The network is tiny: mean colours
of a 4x4 grid of cells -> linear layer -> sigmoid. A few colour tags are wired to what they say
(`red_theme` fires on red pictures) so demo captions follow the images; the rest is random.

Needs the `onnx` package (imported here only): the tagger itself needs just onnxruntime.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ..dataset.atomic import write_bytes_atomic, write_text_atomic
from ..errors import MissingPackageError
from .labels import CHARACTER, GENERAL, RATING
from .registry import MODEL_FILE, TAGS_FILE

GRID = 4  # cells per side; the input size must be a multiple of it

RATINGS = ("general", "sensitive", "questionable", "explicit")
GENERAL_TAGS = (
    "1girl", "solo", "long_hair", "short_hair", "smile", "looking_at_viewer", "simple_background",
    "white_background", "red_theme", "green_theme", "blue_theme", "monochrome", "greyscale", "outdoors",
    "indoors", "sky", "blue_sky", "cloud", "day", "night", "tree", "grass", "flower", "water",
    "open_mouth", "closed_eyes", "blush", "holding", "standing", "sitting", "upper_body", "full_body",
    "portrait", "no_humans", "scenery", "still_life", "fruit", "food", "animal", "cat", "dog",
    "^_^", ">_<", "0_0", "(o)_(o)", "+_+", "._.", "x_x", "3_3", "u_u",
    "star_(symbol)", "heart_(symbol)", ":d", ":o", ";)",
)
CHARACTER_TAGS = (
    "hatsune_miku", "hatsune_miku_(cosplay)", "kagamine_rin", "hakurei_reimu", "kirisame_marisa",
    "saber_(fate)", "artoria_pendragon_(fate)", "link_(the_legend_of_zelda)",
)


def demo_tags() -> list[tuple[str, int]]:
    """(name, category) rows in selected_tags.csv order: ratings, general, characters."""
    return ([(t, RATING) for t in RATINGS] + [(t, GENERAL) for t in GENERAL_TAGS]
            + [(t, CHARACTER) for t in CHARACTER_TAGS])


def _tags_csv(rows: list[tuple[str, int]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    for i, (name, category) in enumerate(rows):
        tag_id = 9999999 - i if category == RATING else 100000 + i
        writer.writerow([tag_id, name, category, 1000000 // (i + 1)])
    return out.getvalue()


def _weights(rows: list[tuple[str, int]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features x tags) weights and biases. Feature k = channel (B, G, R) * 16 + cell, centred to +-0.5."""
    rng = np.random.default_rng(seed)
    n_feat = 3 * GRID * GRID
    w = rng.normal(0.0, 2.0 / np.sqrt(n_feat), (n_feat, len(rows)))
    b = np.array([-1.0 if c == RATING else (-2.0 if c == GENERAL else -2.5) for _, c in rows])
    b = b + rng.normal(0.0, 1.0, len(rows))
    # A demo dataset is "general" (safe): its rating wins for any picture.
    b[:len(RATINGS)] = (1.5, -1.0, -2.5, -3.0)
    w[:, :len(RATINGS)] *= 0.3
    per_channel = GRID * GRID
    colour = {"blue_theme": 0, "green_theme": 1, "red_theme": 2}
    for j, (name, _) in enumerate(rows):
        if name in colour:  # channel mean minus the other two: fires on pictures of that colour
            w[:, j] = -4.0 / per_channel
            ch = colour[name]
            w[ch * per_channel:(ch + 1) * per_channel, j] = 8.0 / per_channel
            b[j] = -2.0
        elif name in ("white_background", "simple_background"):
            w[:, j] = 6.0 / n_feat  # bright pictures
            b[j] = -1.0
    return w.astype(np.float32), b.astype(np.float32)


def build_demo_onnx(*, size: int = 64, batch: str | int = "dynamic", seed: int = 0) -> tuple[bytes, str]:
    """(model.onnx bytes, selected_tags.csv text) of the synthetic tagger."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise MissingPackageError("onnx", "Building the demo tagger") from e
    if size % GRID or size <= 0:
        raise ValueError(f"size must be a positive multiple of {GRID}, got {size}")
    if batch not in ("dynamic", 1):
        raise ValueError(f"batch must be 'dynamic' or 1, got {batch!r}")
    rows = demo_tags()
    w, b = _weights(rows, seed)
    dynamic = batch == "dynamic"
    in_name, out_name = ("input", "output") if dynamic else ("input_1:0", "predictions_sigmoid")
    n_dim = "batch_size" if dynamic else 1
    cell = size // GRID
    inits = [
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.5, np.float32), "centre"),
        numpy_helper.from_array(np.array([-1, w.shape[0]], np.int64), "flat_shape"),
        numpy_helper.from_array(w, "weight"),
        numpy_helper.from_array(b, "bias"),
    ]
    nodes = [
        helper.make_node("Transpose", [in_name], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "scale"], ["unit"]),
        helper.make_node("Sub", ["unit", "centre"], ["centred"]),
        helper.make_node("AveragePool", ["centred"], ["cells"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Reshape", ["cells", "flat_shape"], ["features"]),
        helper.make_node("MatMul", ["features", "weight"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes, "wd14_demo_tagger",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [n_dim, size, size, 3])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [n_dim, len(rows)])],
        initializer=inits,
    )
    # IR 8 / opset 17: loadable by onnxruntime 1.16 (the A1111 stack) and every newer release.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="lora_trainer.demo_tagger")
    onnx.checker.check_model(model)
    return model.SerializeToString(), _tags_csv(rows)


def write_demo_tagger(folder: str | os.PathLike[str], *, size: int = 64, batch: str | int = "dynamic",
                      seed: int = 0) -> Path:
    """Write `model.onnx` + `selected_tags.csv` of the synthetic tagger into `folder`; return it.

    The folder can then be passed as `--model` / `Tagger.load(folder)` like a real tagger's.
    """
    folder = Path(folder)
    model, tags = build_demo_onnx(size=size, batch=batch, seed=seed)
    write_bytes_atomic(folder / MODEL_FILE, model)
    write_text_atomic(folder / TAGS_FILE, tags)
    return folder
