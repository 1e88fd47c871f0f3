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



def test_the_demo_passes_the_other_shapes_as_its_leak_check_set(tmp_path):
    """The demo (on the shipped model) writes the other shapes' pictures with their captions to a leak-check folder
    and passes it as `leak_check_dir`: never trained on (no reg/ in its dataset), only scored for the report's
    leakage; its dataset's steps are the star pictures' alone (16 at batch 4: 120 steps for 30 epochs)."""
    from lora_trainer.commands.demo import OTHERS_DIR, demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import DEMO_MODEL, TRIGGER
    from lora_trainer.demo.dataset import write_concept_images, write_other_images
    from lora_trainer.train.planning import prepare_dataset as plan_dataset

    assert OTHERS_DIR == "leak-check"
    write_concept_images(tmp_path / "images", 16, 1)
    others = write_other_images(tmp_path / OTHERS_DIR, 16, 101)
    assert len(others) == 16 and all(p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in others)
    assert all("demostar" not in p.with_suffix(".txt").read_text(encoding="utf-8") for p in others)
    data = prepare_dataset(tmp_path / "images", tmp_path / "dataset", TRIGGER, repeats=1, resolution=64).out
    config = demo_config(str(DEMO_MODEL), data, tmp_path / "lora", epochs=30, seed=1, device="cpu",
                         leak_check=tmp_path / OTHERS_DIR)
    assert config.leak_check_dir == str(tmp_path / OTHERS_DIR) and not config.reg_data
    dataset, plan = plan_dataset(config, decode=False)
    assert dataset.reg_root is None and not any(item.is_reg for item in dataset.items)
    assert len(dataset.leak_check) == 16 and plan.total_steps == 120
