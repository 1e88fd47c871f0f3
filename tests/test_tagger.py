"""WD14 tagger against an independent re-implementation of SmilingWolf's reference.

Real onnxruntime sessions on synthetic taggers built with the `onnx` package in the WD14
interface (dynamic batch like v3, fixed batch 1 like v2). The reference side below is written
from SmilingWolf's wd-tagger app.py description, not with our code: PIL RGBA canvas +
alpha_composite on white, centred white square padding, BICUBIC resize only when the size
differs, float32, RGB->BGR, batch of one image per run; strict `>` thresholds, MCut, kaomoji.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from lora_trainer.dataset.samples import gradient
from lora_trainer.errors import TaggerError
from lora_trainer.tagger import session as session_module
from lora_trainer.tagger.demo_model import write_demo_tagger
from lora_trainer.tagger.engine import Tagger
from lora_trainer.tagger.folder import tag_folder
from lora_trainer.tagger.thresholds import TagOptions, compose_caption, mcut_threshold, select_tags

REF_KAOMOJIS = ["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"]


# ---- the independent reference -----------------------------------------------------------------

def ref_prepare(path: Path, size: int) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, ((max_dim - image.size[0]) // 2, (max_dim - image.size[1]) // 2))
    if max_dim != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1]


def ref_scores(model: Path, path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = inp.shape[1]
    return sess.run([sess.get_outputs()[0].name], {inp.name: ref_prepare(path, size)[None]})[0][0]


def ref_labels(csv_path: Path) -> tuple[list[str], list[int], list[int], list[int]]:
    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [r["name"].replace("_", " ") if r["name"] not in REF_KAOMOJIS else r["name"] for r in rows]
    cats = [int(r["category"]) for r in rows]
    return names, [i for i, c in enumerate(cats) if c == 9], [i for i, c in enumerate(cats) if c == 0], \
        [i for i, c in enumerate(cats) if c == 4]


def ref_mcut(probs: np.ndarray) -> float:
    s = probs[probs.argsort()[::-1]]
    difs = s[:-1] - s[1:]
    t = difs.argmax()
    return float((s[t] + s[t + 1]) / 2)


def ref_caption(csv_path: Path, scores: np.ndarray, general: float = 0.35, character: float = 0.85,
                general_mcut: bool = False, character_mcut: bool = False) -> list[str]:
    names, _, gen, char = ref_labels(csv_path)
    if general_mcut:
        general = ref_mcut(np.array([scores[i] for i in gen]))
    if character_mcut:
        character = max(0.15, ref_mcut(np.array([scores[i] for i in char])))
    picked = {names[i]: scores[i] for i in gen if scores[i] > general}
    picked.update({names[i]: scores[i] for i in char if scores[i] > character})
    return [k for k, _ in sorted(picked.items(), key=lambda kv: kv[1], reverse=True)]


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("taggers")
    return {
        "dynamic": write_demo_tagger(root / "dyn", size=64, batch="dynamic", seed=0),
        "fixed": write_demo_tagger(root / "fixed", size=32, batch=1, seed=1),
        "real_size": write_demo_tagger(root / "448", size=448, batch="dynamic", seed=2),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    gradient(120, 60, seed=1).save(folder / "wide.png")
    gradient(61, 90, seed=2).save(folder / "tall_odd.jpg", quality=90)
    gradient(64, 64, seed=3).save(folder / "exact64.png")  # no resize for the 64 px model
    rgba = gradient(50, 70, seed=4).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(50 * 70) % 256).reshape(70, 50).astype(np.uint8)))
    rgba.save(folder / "alpha.png")
    gradient(100, 100, seed=5).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    gradient(90, 40, seed=6).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    gradient(600, 500, seed=7).save(folder / "big.webp", lossless=True)
    return folder


# ---- preprocessing and scores ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dynamic", "fixed", "real_size"])
def test_preprocessing_and_scores_match_reference(models: dict[str, Path], images: Path, kind: str) -> None:
    from lora_trainer.dataset.images import load_image

    tagger = Tagger.load(models[kind])
    paths = sorted(images.iterdir())
    batch = tagger.prepare([load_image(p) for p in paths])
    for arr, path in zip(batch, paths):
        np.testing.assert_array_equal(arr, ref_prepare(path, tagger.size), err_msg=path.name)
    scores = tagger.predict_arrays(batch)
    for row, path in zip(scores, paths):
        np.testing.assert_allclose(row, ref_scores(models[kind] / "model.onnx", path), rtol=1e-5, atol=1e-6)


def test_graph_info_from_onnx(models: dict[str, Path]) -> None:
    dyn, fixed = Tagger.load(models["dynamic"]), Tagger.load(models["fixed"])
    assert (dyn.info.input_name, dyn.info.output_name, dyn.size, dyn.info.batch) == ("input", "output", 64, None)
    assert (fixed.info.input_name, fixed.size, fixed.info.batch) == ("input_1:0", 32, 1)
    assert dyn.batch_size(8) == 8 and fixed.batch_size(8) == 1
    assert dyn.provider == "CPUExecutionProvider"


def test_batched_equals_one_by_one(models: dict[str, Path], images: Path) -> None:
    from lora_trainer.dataset.images import load_image

    tagger = Tagger.load(models["dynamic"])
    imgs = [load_image(p) for p in sorted(images.iterdir())]
    together = tagger.predict(imgs)
    alone = np.concatenate([tagger.predict([im]) for im in imgs])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


# ---- thresholds, ordering, names ------------------------------------------------------------------

def _scores(tagger: Tagger, values: dict[str, float]) -> np.ndarray:
    s = np.zeros(len(tagger.labels), np.float64)  # exact 0.35 / 0.85 edges (float32 0.85 is above 0.85)
    for name, p in values.items():
        s[tagger.labels.names.index(name)] = p
    return s


def test_thresholds_strict_order_kaomoji_and_parentheses(models: dict[str, Path]) -> None:
    tagger = Tagger.load(models["dynamic"])
    s = _scores(tagger, {"general": 0.2, "sensitive": 0.7, "1girl": 0.9, "smile": 0.35, "long_hair": 0.36,
                         "^_^": 0.5, "hatsune_miku_(cosplay)": 0.86, "kagamine_rin": 0.85, "star_(symbol)": 0.6})
    assert select_tags(s, tagger.labels, TagOptions()) == [
        "1girl", "hatsune miku (cosplay)", "star (symbol)", "^_^", "long hair"]
    assert select_tags(s, tagger.labels, TagOptions()) == ref_caption(models["dynamic"] / "selected_tags.csv", s)
    assert select_tags(s, tagger.labels, TagOptions(include_rating=True))[0] == "sensitive"
    assert "hatsune miku (cosplay)" not in select_tags(s, tagger.labels, TagOptions(include_characters=False))
    assert select_tags(s, tagger.labels, TagOptions(replace_underscores=False))[:2] == [
        "1girl", "hatsune_miku_(cosplay)"]
    opts = TagOptions(exclude=["Long Hair", "star_(symbol)"], replacements={"1girl": "1woman", "^_^": ""})
    assert select_tags(s, tagger.labels, opts) == ["1woman", "hatsune miku (cosplay)"]
    opts = TagOptions(general_threshold=0.0, character_threshold=1.0)
    assert len(select_tags(s, tagger.labels, opts)) == 5  # > 0 only: zero scores never pass


def test_mcut_matches_reference_and_character_floor(models: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(30)
        assert mcut_threshold(p) == pytest.approx(ref_mcut(p))
    tagger = Tagger.load(models["dynamic"])
    csv_path = models["dynamic"] / "selected_tags.csv"
    s = _scores(tagger, {"1girl": 0.9, "solo": 0.8, "smile": 0.3, "sky": 0.25, "kagamine_rin": 0.1,
                         "hakurei_reimu": 0.05})
    opts = TagOptions(general_mcut=True, character_mcut=True)
    assert select_tags(s, tagger.labels, opts) == ["1girl", "solo"]  # largest gap 0.8 -> 0.3
    assert select_tags(s, tagger.labels, opts) == ref_caption(csv_path, s, general_mcut=True, character_mcut=True)
    s[tagger.labels.names.index("kagamine_rin")] = 0.3  # MCut 0.15 for characters, floor 0.15: passes
    assert "kagamine rin" in select_tags(s, tagger.labels, opts)
    s[tagger.labels.names.index("kagamine_rin")] = 0.14  # MCut would be 0.07; the floor keeps it out
    assert "kagamine rin" not in select_tags(s, tagger.labels, opts)


def test_compose_trigger_always_first_and_modes() -> None:
    opts = TagOptions(trigger="mychar", always_first=["solo", "1girl"])
    pred = ["smile", "1girl", "long hair", "solo", "mychar"]
    assert compose_caption(pred, opts) == ["mychar", "solo", "1girl", "smile", "long hair"]
    existing = ["my own words", "long_hair"]
    assert compose_caption(pred, opts, existing, "append") == [
        "mychar", "my own words", "long_hair", "solo", "1girl", "smile"]
    assert compose_caption(pred, TagOptions(), existing, "overwrite") == pred


# ---- folders, modes, report -----------------------------------------------------------------------

def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (w, h) in enumerate([(80, 50), (40, 90), (64, 64)]):
        gradient(w, h, seed=20 + i).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return folder


def test_tag_folder_report_and_captions(models: dict[str, Path], tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    tagger = Tagger.load(models["dynamic"])
    report = tmp_path / "report.json"
    opts = TagOptions(trigger="mychar", character_threshold=0.0)
    run = tag_folder(folder, tagger, opts, mode="overwrite", batch_size=2, report=report)
    data = json.loads(report.read_text(encoding="utf-8"))
    assert sorted(data["images"]) == ["p0.png", "p1.png", "p2.png"]
    assert list(data["skipped"]) == ["broken.jpg"] and "truncated" in data["skipped"]["broken.jpg"]
    csv_path = models["dynamic"] / "selected_tags.csv"
    names = [r["name"] for r in csv.DictReader(csv_path.read_text(encoding="utf-8").splitlines())]
    for rel, entry in data["images"].items():
        assert list(entry["scores"]) == names  # every rating, general and character tag, CSV spelling
        ref = ref_scores(models["dynamic"] / "model.onnx", folder / rel)
        np.testing.assert_allclose([entry["scores"][n] for n in names], ref, rtol=1e-5, atol=1e-6)
        expected = ["mychar", *ref_caption(csv_path, np.array([entry["scores"][n] for n in names]), character=0.0)]
        assert entry["caption"] == ", ".join(expected)
        text = (folder / rel).with_suffix(".txt").read_text(encoding="utf-8")
        assert text == entry["caption"] + "\n"
        assert "(" in text and "\\(" not in text  # caption files keep parentheses unescaped
    assert run.provider == "CPUExecutionProvider"


def test_batches_prefetched_in_threads_keep_order_progress_and_skips(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(7):
        gradient(40 + 7 * i, 50, seed=40 + i).save(folder / f"m{i}.png")
    (folder / "m3b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")  # fails inside the second batch
    tagger = Tagger.load(models["dynamic"])
    progress: list[tuple[int, int]] = []
    run = tag_folder(folder, tagger, mode="overwrite", batch_size=3, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [(3, 8), (6, 8), (8, 8)]
    assert sorted(run.captions) == [f"m{i}.png" for i in range(7)] and list(run.skipped) == ["m3b.jpg"]
    for rel in run.captions:  # each score row belongs to its own image
        ref = ref_scores(models["dynamic"] / "model.onnx", folder / rel)
        np.testing.assert_allclose([run.scores[rel][n] for n in tagger.labels.names], ref, rtol=1e-5, atol=1e-6)


def test_modes_append_overwrite_skip(models: dict[str, Path], tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    tagger = Tagger.load(models["fixed"])  # fixed batch 1 with batch_size 8 asked
    (folder / "p0.txt").write_text("my own words, 1girl\n", encoding="utf-8")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.suffix != ".txt"}
    run = tag_folder(folder, tagger, mode="skip", batch_size=8)
    assert run.batch_size == 1
    assert (folder / "p0.txt").read_text(encoding="utf-8") == "my own words, 1girl\n"
    assert run.skipped["p0.png"] == "has a caption already (mode skip)" and "p0.png" not in run.captions
    predicted = run.captions["p1.png"]
    run = tag_folder(folder, tagger, mode="append")
    p0 = run.captions["p0.png"].split(", ")
    assert p0[:2] == ["my own words", "1girl"] and len(p0) == len(set(p0))
    assert run.captions["p1.png"] == predicted  # append to our own caption: nothing new, no duplicates
    again = tag_folder(folder, tagger, mode="append")
    assert again.captions == run.captions  # idempotent
    over = tag_folder(folder, tagger, mode="overwrite")
    assert "my own words" not in over.captions["p0.png"]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.suffix != ".txt"}
    assert after == before  # images untouched: same bytes, same modification times


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_fallback_to_cpu(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    # Only the list of providers is faked (no GPU here); onnxruntime itself then refuses CUDA for real.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # pip-installed CUDA libraries are preloaded once per process; a failure there is not fatal.
    preloads: list[int] = []

    def preload_dlls() -> None:
        preloads.append(1)
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(session_module, "_preloaded", False)
    with caplog.at_level(logging.WARNING):
        tagger = Tagger.load(models["dynamic"], provider="auto")
        Tagger.load(models["dynamic"], provider="cuda")
    assert tagger.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in caplog.text and "CPU" in caplog.text
    assert preloads == [1]


def test_labels_must_match_outputs(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((models["dynamic"] / "model.onnx").read_bytes())
    lines = (models["dynamic"] / "selected_tags.csv").read_text(encoding="utf-8").splitlines()
    (bad / "selected_tags.csv").write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(TaggerError, match="same tagger"):
        Tagger.load(bad)
