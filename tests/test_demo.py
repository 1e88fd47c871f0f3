"""`python -m lora_trainer demo --tiny`: the whole pipeline offline on the CPU, on a random tiny model
(the demo on the shipped demo model runs in tests/test_cli_output.py)."""

from __future__ import annotations

import json

from PIL import Image

from lora_trainer.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--epochs", "1", "--images", "4"]) == 0
    printed = capsys.readouterr().out
    lora = out / "lora" / "demo-lora.safetensors"
    assert lora.is_file() and f"LoRA:          {lora}" in printed
    meta = json.loads((out / "lora" / "demo-lora.json").read_text(encoding="utf-8"))
    assert meta["activation text"] == "demoshape" and meta["sd version"] == "SD1"
    # captions come from the synthetic WD14 tagger through the real tagger code, trigger first
    captions = sorted((out / "dataset" / "img").glob("*/*.txt"))
    assert len(captions) == 4 and all(c.read_text(encoding="utf-8").startswith("demoshape") for c in captions)
    assert (out / "dataset" / "img" / "2_demoshape").is_dir()
    ab = Image.open(out / "ab.png")
    assert ab.width == 2 * 128 and f"A/B image:     {out / 'ab.png'}" in printed
    left, right = ab.crop((0, 14, 128, 142)), ab.crop((128, 14, 256, 142))
    assert left.tobytes() != right.tobytes()  # the LoRA changes the picture (same seed and prompt)

