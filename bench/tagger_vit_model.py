"""A randomly initialised ViT-B/16 at 448 px with 10,861 sigmoid outputs, in the WD14 interface, as ONNX.

Same cost as SmilingWolf's wd-vit-tagger-v3 (ViT-B/16, 448 px -> 784 patches + class token,
12 layers, width 768, 12 heads, MLP 3072, 10,861 tags): NHWC float32 BGR 0-255 input named
`input` with a dynamic batch, output `output`. Built op by op with the `onnx` helper instead of
exporting timm through torch: torchvision (which timm imports) does not load beside the CPU
torch here, and this way the benchmark needs only `onnx`, `numpy` and onnxruntime(-gpu).
The graph is the plain unfused form an exporter writes (LayerNormalization, MatMul, Softmax,
Erf-GELU); onnxruntime applies its own fusions at session start, as it would for the real model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def build_vit_tagger(folder: str | Path, *, size: int = 448, patch: int = 16, width: int = 768, depth: int = 12,
                     heads: int = 12, mlp: int = 3072, tags: int = 10861, seed: int = 0) -> Path:
    """Write model.onnx + selected_tags.csv (4 ratings, general, 2,000 character tags) into `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []
    count = [0]

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))  # 0-d stays 0-d (Gather indices)
        return name

    def weight(name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        return const(name, rng.normal(0.0, std, shape).astype(np.float32))

    def node(op: str, inputs: list[str], **attrs: object) -> str:
        count[0] += 1
        out = f"{op.lower()}_{count[0]}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def layer_norm(x: str, prefix: str) -> str:
        return node("LayerNormalization", [x, const(f"{prefix}.g", np.ones(width, np.float32)),
                                           const(f"{prefix}.b", np.zeros(width, np.float32))],
                    axis=-1, epsilon=1e-6)

    def linear(x: str, prefix: str, n_in: int, n_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{prefix}.w", (n_in, n_out))])
        return node("Add", [mm, const(f"{prefix}.bias", np.zeros(n_out, np.float32))])

    grid = size // patch
    tokens = grid * grid + 1
    head_dim = width // heads
    # WD14 input: NHWC BGR 0-255 -> NCHW, scaled to -1..1 (the model's own normalisation).
    x = node("Transpose", ["input"], perm=[0, 3, 1, 2])
    x = node("Sub", [node("Mul", [x, const("in_scale", np.array(1 / 127.5, np.float32))]),
                     const("one", np.array(1.0, np.float32))])
    x = node("Conv", [x, weight("patch.w", (width, 3, patch, patch)), const("patch.b", np.zeros(width, np.float32))],
             kernel_shape=[patch, patch], strides=[patch, patch])
    x = node("Reshape", [x, const("flat3", np.array([0, width, grid * grid], np.int64))])
    x = node("Transpose", [x], perm=[0, 2, 1])  # (B, 784, 768)
    batch = node("Slice", [node("Shape", ["input"]), const("s0", np.array([0], np.int64)),
                           const("s1", np.array([1], np.int64))])
    cls_shape = node("Concat", [batch, const("one_width", np.array([1, width], np.int64))], axis=0)
    cls = node("Expand", [weight("cls", (1, 1, width)), cls_shape])
    x = node("Concat", [cls, x], axis=1)
    x = node("Add", [x, weight("pos", (1, tokens, width))])
    split_shape = const("qkv_shape", np.array([0, 0, 3, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, width], np.int64))
    scale = const("attn_scale", np.array(head_dim ** -0.5, np.float32))
    sqrt_half = const("sqrt_half", np.array(2 ** -0.5, np.float32))
    half = const("half", np.array(0.5, np.float32))
    for i in range(depth):
        p = f"blocks.{i}"
        h = layer_norm(x, f"{p}.norm1")
        qkv = node("Reshape", [linear(h, f"{p}.qkv", width, 3 * width), split_shape])
        qkv = node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # (3, B, heads, T, head_dim)
        q, k, v = (node("Gather", [qkv, const(f"{p}.idx{j}", np.array(j, np.int64))], axis=0) for j in range(3))
        att = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        att = node("Softmax", [att], axis=-1)
        o = node("Transpose", [node("MatMul", [att, v])], perm=[0, 2, 1, 3])
        x = node("Add", [x, linear(node("Reshape", [o, merge_shape]), f"{p}.proj", width, width)])
        h = linear(layer_norm(x, f"{p}.norm2"), f"{p}.fc1", width, mlp)
        gelu = node("Mul", [node("Mul", [h, half]),
                            node("Add", [node("Erf", [node("Mul", [h, sqrt_half])]),
                                         const(f"{p}.one", np.array(1.0, np.float32))])])
        x = node("Add", [x, linear(gelu, f"{p}.fc2", mlp, width)])
    x = layer_norm(x, "norm")
    x = node("Gather", [x, const("cls_idx", np.array(0, np.int64))], axis=1)  # class token: (B, 768)
    logits = linear(x, "head", width, tags)
    nodes.append(helper.make_node("Sigmoid", [logits], ["output"]))
    graph = helper.make_graph(
        nodes, "wd_vit_tagger_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", tags])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["tag_id", "name", "category", "count"])
        for i in range(tags):
            category = 9 if i < 4 else (0 if i < tags - 2000 else 4)
            w.writerow([i, ("general", "sensitive", "questionable", "explicit")[i] if i < 4 else f"tag_{i}",
                        category, tags - i])
    return folder
