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


def test_progress_shows_the_phase_between_steps_and_the_eta_counting_it():
    from lora_trainer.ui import logic

    job = {"state": "running", "step": 150, "total_steps": 600, "epoch": 1, "total_epochs": 4, "loss": 0.1,
           "it_per_s": 5.0, "eta_s": 130.0, "phase": "sample", "phase_done": 7, "phase_total": 20}
    shown = logic.progress_html(job)
    assert "step 150/600 · epoch 1/4" in shown and "ETA 0:02:10" in shown
    assert "data-phase='sample'" in shown and "<b>Sampling</b> 7/20" in shown
    assert "lora_trainer_phase" not in logic.progress_html({**job, "phase": "train"})
    assert "lora_trainer_phase" not in logic.progress_html({**job, "state": "stopped"})


def test_an_old_error_line_goes_when_a_later_action_succeeds():
    from lora_trainer.ui import logic

    error = "**Error:** **Training data** is empty; prepare the dataset in step 3."
    assert logic.outdated_errors("Started `shapes`.", error) == ""
    assert logic.outdated_errors("Prepared `/d`.", error, "a plan") == ("", "a plan")
    assert logic.outdated_errors("**Error:** again", error) == error  # still failing: both stay
    assert logic.outdated_errors("", error) == error  # asked first (nothing done yet)


def test_messages_name_the_forms_fields_not_cli_flags():
    from lora_trainer.ui.texts import form_message

    assert form_message("The run has zero steps (epochs and max_steps are both 0); set --epochs or --max-steps "
                        "to at least 1.") == ("The run has zero steps (**Epochs** and **Max steps** are both 0); set "
                                              "**Epochs** (or **Max steps**) to at least 1.")
    assert form_message("No model to train on was given; pass --model with a checkpoint file (or set \"model\" in "
                        "the request).") == "No model to train on was given; type a checkpoint in **Checkpoint file**."
    assert form_message("rank must be at least 1 (got 0); raise it.") == "**Rank** must be at least 1 (got 0); raise it."
    # ordinary words stay as they are; what the form has no field for keeps its setting name
    assert form_message("max_timestep 2000 is beyond the model's 1000 timesteps; lower it.") == \
        "max_timestep 2000 is beyond the model's 1000 timesteps; lower it."
    assert form_message("lower batch_size or resolution", bold=False) == "lower Batch size or resolution"
    assert form_message("Leak-check folder /x does not exist; check the path, or leave leak_check_dir empty.") == \
        "Leak-check folder /x does not exist; check the path, or leave **Leak-check folder** empty."
    assert form_message("give --leak-check-dir") == "give **Leak-check folder**"


def test_more_settings_typos_get_the_closest_name():
    import pytest

    from lora_trainer.errors import ConfigError
    from lora_trainer.ui.texts import check_extra_keys

    with pytest.raises(ConfigError, match=r"^More settings: 'noise_ofset' is not a setting; did you mean "
                                          r"'noise_offset'\?$"):
        check_extra_keys(["noise_ofset"], {"noise_offset", "rank"}, {})
    with pytest.raises(ConfigError, match="'device' cannot be set here"):
        check_extra_keys(["device"], {"rank"}, {"device": "the server decides which device trains"})


def test_tagger_modes_are_explained_before_they_run(tmp_path):
    from lora_trainer.ui import captions as ch

    folder = tmp_path / "p"
    folder.mkdir()
    images = []
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
        images.append(str(folder / f"{i}.png"))
    state = ch.caption_state(tmp_path, folder, images)
    assert ch.mode_preview(state, ch.DEFAULT_TAG_MODE) == ("None of the 3 images has a caption yet: the tagger "
                                                          "writes one for each.")
    (folder / "0.txt").write_text("ohwx, red, smile")
    (folder / "1.txt").write_text("ohwx, blue")
    ch.record_tagging(tmp_path, folder, {"0.png": "ohwx, red, smile, portrait", "1.png": "ohwx, blue"})
    ch.record_bulk(tmp_path, folder, removed=["blue theme"])
    state = ch.caption_state(tmp_path, folder, images)
    assert (state.captioned, state.changed, state.foreign) == (2, ["0.png"], [])
    assert state.keep_out == {"0.png": {"portrait", "blue theme"}, "1.png": {"blue theme"}}
    text = ch.mode_preview(state, "Add new tags to existing captions")
    assert text.startswith("**2 of 3 images already have a caption** (1 changed by you since the tagger wrote them).")
    assert "- *Only images without a caption*: tags the 1 image(s) without a caption; the 2 caption(s) stay" in text
    assert "**→ *Add new tags to existing captions*" in text and "tags you took out stay out (blue theme, portrait)" in text
    assert "**your changes to 1 caption(s) are lost**" in text
    ch.record_bulk(tmp_path, folder, added=["Blue Theme"])  # added back in bulk: the tagger may write it again
    assert ch.caption_state(tmp_path, folder, images).removed == []


def test_the_line_beside_the_buttons_and_the_time_estimate(tmp_path):
    from types import SimpleNamespace

    from lora_trainer.config import TrainConfig
    from lora_trainer.host import StandaloneHost
    from lora_trainer.jobs import JobManager
    from lora_trainer.train.events import TrainingPlan
    from lora_trainer.ui import live, plan

    jobs = JobManager(StandaloneHost(tmp_path / "Lora"), work_dir=tmp_path / "runs")
    assert live.run_state_md(jobs) == "Nothing is training." and live.busy_question(jobs, "Training") is None
    config = TrainConfig(resolution=512, batch_size=2, epochs=2, sample_prompts=["a"], sample_every_n_epochs=1,
                         sample_steps=20)
    training = TrainingPlan(num_images=10, num_reg_images=0, images_x_repeats=100, reg_x_repeats=0,
                            samples_per_epoch=100, batch_size=2, gradient_accumulation_steps=1, batches_per_epoch=50,
                            steps_per_epoch=50, epochs=2, total_steps=100)
    gpu = plan.Setup(model="m.safetensors", family="SD1", device="cuda:0", device_text="GPU")
    history = [{"kind": "train", "it_per_s": 4.0, "family": "SD1", "label": "train old", "created": 1,
                "config": {"resolution": 512, "batch_size": 1, "gradient_accumulation_steps": 1}}]
    # 4 it/s at batch 1 -> 2 it/s at batch 2: 100 steps 50 s + 2 sampling rounds of 20 CFG steps (~3.3 s each)
    assert plan.time_estimate(config, training, gpu, history).startswith("**Time:** under a minute for 100 steps at "
                                                                         "about 2.00 it/s (measured by the run "
                                                                         "'train old' here")
    assert "roughly" in plan.time_estimate(config, training, gpu, [])  # a first guess, said to be one
    # the whole run counts: 2000 steps of Flux at 1024 px, first guess 0.5 it/s, said as a range (x2 .. x0.5)
    flux = plan.Setup(model="flux1-dev.safetensors", family="Flux", device="cuda:0", device_text="GPU")
    long_run = TrainConfig(resolution=1024, batch_size=1, epochs=10)
    steps = TrainingPlan(num_images=20, num_reg_images=0, images_x_repeats=200, reg_x_repeats=0, samples_per_epoch=200,
                         batch_size=1, gradient_accumulation_steps=1, batches_per_epoch=200, steps_per_epoch=200,
                         epochs=10, total_steps=2000)
    assert plan.time_estimate(long_run, steps, flux, []).startswith(
        "**Time:** roughly 33 min to 2 h 13 min for 2000 steps")
    # Chroma: Flux's per-token compute (its missing modulation Linears run once per image), so Flux's guess
    chroma = plan.Setup(model="chroma-unlocked-v50.safetensors", family="Chroma", device="cuda:0", device_text="GPU")
    assert plan.time_estimate(long_run, steps, chroma, []) == plan.time_estimate(long_run, steps, flux, [])
    assert "roughly" in plan.time_estimate(long_run, steps, chroma, [])
    assert "measured by the first run here" in plan.time_estimate(
        config, training, SimpleNamespace(family="SD1", device="cpu"), [])
    assert plan.preset_warning("sdxl", "SD1").startswith("⚠️ The preset is made for SDXL models (it trains at 1024 "
                                                        "px), but the model is SD1")
    assert plan.preset_warning("sd15", "SD2") == "" and plan.preset_warning("sd15", None) == ""


def test_the_model_line_shows_free_memory_without_churning():
    from types import SimpleNamespace

    from lora_trainer.ui import plan

    gib = 2**30
    gpu = plan.Setup(model="m.safetensors", family="SD1", device="cuda:0", device_text="RTX 4070",
                     free=int(7.26 * gib), total=12 * gib)
    assert plan.setup_md(gpu) == "**Model:** `m.safetensors` (SD1) · **Device:** RTX 4070 (7.3 of 12.0 GiB free)"
    # small moves keep the number the page shows; a noticeable one (here over 0.6 GiB = 5%) shows
    assert plan.steady(gpu, int(7.0 * gib)).free == int(7.0 * gib)
    assert plan.steady(gpu, int(8.0 * gib)).free == int(7.26 * gib)
    assert plan.steady(gpu, None) is gpu
    cpu = plan.describe_setup(SimpleNamespace(device=lambda: "cpu"))
    assert cpu.free and cpu.total and ", " in plan.setup_md(cpu) and "GiB of RAM free" in plan.setup_md(cpu)


def test_ui_help_lists_the_presets():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lora_trainer", "ui", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "sdxl-lowvram (SDXL low-VRAM — 8 GB)" in " ".join(out.split())
