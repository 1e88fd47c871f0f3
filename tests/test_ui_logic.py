"""Pure helpers behind the tab (no Gradio needed)."""

from __future__ import annotations

from PIL import Image

from lora_trainer.ui import logic


def test_ab_grids_come_first_in_the_samples_gallery(tmp_path):
    grid = tmp_path / "mycat.ab-grid.png"
    second = tmp_path / "mycat.ab-grid-1763790000.png"
    sample = tmp_path / "mycat_e000001_00.png"
    for p in (grid, second, sample):
        Image.new("RGB", (8, 8), "red").save(p)
    outputs = [str(tmp_path / "mycat.safetensors"), str(grid), str(tmp_path / "mycat.json"), str(second)]
    assert logic.ab_grids(outputs) == [str(grid), str(second)]
    items = logic.sample_items(logic.ab_grids(outputs) + [str(sample)])
    assert [name for _, name in items] == ["mycat.ab-grid", "mycat.ab-grid-1763790000", "mycat_e000001_00"]


def test_host_notes_are_shown_in_progress_and_result():
    """E.g. Forge/Neo with fp8 storage: the run trains from the checkpoint file, and the tab says so."""
    note = "cannot train on the loaded model in place (UNet in fp8 e4m3fn); loading m.safetensors from disk"
    job = {"kind": "train", "state": "done", "lora_name": "x", "prompt_text": "<lora:x:0.8>", "outputs": [],
           "total_steps": 2, "step": 2, "message": "Done", "notes": [note]}
    assert "Note: cannot train on the loaded model in place (UNet in fp8 e4m3fn)" in logic.progress_html(job)
    assert f"Note: {note}" in logic.result_md(job)
    assert "Note:" not in logic.progress_html({**job, "notes": []})
