"""The tab in headless Chromium, as an artist meets it: the whole flow on `python -m lora_trainer ui
--tiny sd1` (Gradio 3.41 on the A1111 stack, 4.40 on Forge's; skipped where Gradio is missing).

Walks: load pictures, tag, remove a tag from every caption, edit a caption and click another picture,
re-tag in "append" mode, prepare, check the plan, train, press Train again (asked, cancelled), reopen
the page mid-run (a new tab and a reload), queue a run and cancel it, Stop, Resume, the result and
"Copy prompt"; and asserts what the page shows and what lands on disk at each step.

Needs Chromium (Debian: `apt-get install chromium`; `.ci/run` installs it when it can) and
`websockets` (a Gradio dependency). About a minute per stack. `LORA_TRAINER_UPDATE_SCREENSHOTS=1`
also writes the tutorial pictures of docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is not installed in this stack")

from browser_support import ROOT_JS, chromium, chromium_path, env_flag, websockets_ok
from server_support import cli_server
from train_support import shape_image

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"
GRADIO = int(gr.__version__.split(".")[0])
pytestmark = pytest.mark.skipif(chromium_path() is None or not websockets_ok(),
                                reason="needs chromium (apt-get install chromium) and websockets")


def _captions(folder: Path) -> dict[str, list[str]]:
    return {p.stem: [t.strip() for t in p.read_text(encoding="utf-8").split(",") if t.strip()]
            for p in sorted(folder.glob("*.txt"))}


def _job_records(work: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in work.glob("*/job.json")), key=lambda r: r["created"])


def _step(page) -> int:
    m = re.search(r"step (\d+)/(\d+)", page.text("#lora_trainer_progress"))
    return int(m.group(1)) if m else 0


def test_the_whole_flow_in_a_browser(tmp_path, monkeypatch):
    from lora_trainer.tagger.demo_model import write_demo_tagger

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        shape_image(i, (96, 96)).save(photos / f"shape{i}.png")
    tagger = write_demo_tagger(tmp_path / "tagger")
    lora_dir, work = tmp_path / "Lora", tmp_path / "runs"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    shots = env_flag("LORA_TRAINER_UPDATE_SCREENSHOTS") and GRADIO >= 4

    def shot(page, name, selector=None):
        if shots:
            (page.clip_screenshot(SHOTS / name, selector) if selector else page.screenshot(SHOTS / name))

    args = ["ui", "--tiny", "sd1", "--lora-dir", str(lora_dir), "--work-dir", str(work)]
    with cli_server(args, "/", timeout=180, poll_s=0.5, cwd=tmp_path) as (base, _), chromium() as browser:
        page = browser.new_page(base + "/")
        try:
            _walk(page, browser, base, photos, tagger, lora_dir, work, shot)
        except BaseException:
            page.screenshot(tmp_path / "failure.png")  # what the page showed, for the one reading the failure
            print(f"page at the failure: {tmp_path / 'failure.png'}")
            raise


def _walk(page, browser, base, photos, tagger, lora_dir, work, shot):
    started = time.monotonic()

    def log(what):  # where the minute goes, in the -s output
        print(f"{time.monotonic() - started:6.1f}s {what}", flush=True)

    page.wait_text("#lora_trainer_run_state", "Nothing is training")  # the page's own poll answered
    assert "tiny-sd1" in page.text("#lora_trainer_model_info") and "CPU" in page.text("#lora_trainer_model_info")

    log('1. pictures')
    # 1. pictures, with their names under the thumbnails
    page.fill("lora_trainer_folder", photos)
    page.click("#lora_trainer_load")
    page.wait(f"{ROOT_JS}.querySelectorAll('#lora_trainer_gallery img').length >= 6", what="6 thumbnails")
    page.wait_text("#lora_trainer_gallery", "shape0.png")
    page.wait_text("#lora_trainer_tag_preview", "None of the 6 images has a caption yet")
    # the caption editor sits beside the gallery it edits (not far below it)
    gallery, box = (page.eval(f"(() => {{ const r = {page.q(sel)}.getBoundingClientRect();"
                              " return [r.left, r.top, r.right, r.bottom]; })()")
                    for sel in ("#lora_trainer_gallery", "#lora_trainer_caption textarea"))
    assert box[0] >= gallery[2] - 1 and gallery[1] <= box[1] < gallery[3], (gallery, box)

    log('2. tagging')
    # 2. tagging: the trigger word is typed once and becomes the concept
    page.fill("lora_trainer_tagger_model", tagger, commit="Enter")
    page.fill("lora_trainer_trigger", "shape")
    page.wait(f"{ROOT_JS}.querySelector('#lora_trainer_concept textarea, #lora_trainer_concept input')"
              ".value === 'shape'", what="concept filled from the trigger word")
    page.click("#lora_trainer_tag_run")
    page.wait_text("#lora_trainer_tag_status", "done")
    first = _captions(photos)
    assert len(first) == 6 and all(tags[0] == "shape" for tags in first.values())
    page.wait_text("#lora_trainer_gallery", "shape0.png: shape")
    shot(page, "01-pictures-and-captions.png", "#lora_trainer_images_section")

    log('a tag removed')
    # a tag removed from every caption...
    counts: dict[str, int] = {}
    for tags in first.values():
        for t in tags[1:]:
            counts[t] = counts.get(t, 0) + 1
    gone = max(counts, key=lambda t: (counts[t], t))
    page.choose("lora_trainer_bulk_action", "remove")
    page.fill("lora_trainer_bulk_tag", gone)
    page.click("#lora_trainer_bulk_apply")
    page.wait_text("#lora_trainer_bulk_status", f"will not write '{gone}' again")
    assert all(gone not in tags for tags in _captions(photos).values())

    log('...an edit typed')
    # ...an edit typed and not saved, then another picture clicked: kept, not dropped
    page.click_nth("#lora_trainer_gallery .thumbnail-item", 1)
    page.wait_text("#lora_trainer_caption", "shape1.png")
    page.wait(f"(() => {{ const t = {ROOT_JS}.querySelector('#lora_trainer_caption textarea');"
              " return t && t.value.startsWith('shape'); })()", what="caption of shape1 in the box")
    mine = page.value("lora_trainer_caption") + ", my own words"
    page.fill("lora_trainer_caption", mine, commit="")
    page.click_nth("#lora_trainer_gallery .thumbnail-item", 2)
    page.wait_text("#lora_trainer_caption_status", "Kept your edit")
    assert (photos / "shape1.txt").read_text(encoding="utf-8").strip() == mine
    page.wait_text("#lora_trainer_caption", "shape2.png")  # the box is labelled with the picture it shows

    log('...and the tagger')
    # ...and the tagger run again in "append" mode: says what it will do, and undoes nothing
    page.choose("lora_trainer_tag_mode", "Add new tags to existing captions")
    preview = page.wait_text("#lora_trainer_tag_preview", "tags you took out stay out")
    assert gone in preview and "6 of 6 images already have a caption" in preview
    shot(page, "02-retag-preview.png", "#lora_trainer_caption_section")
    page.click("#lora_trainer_tag_run")
    page.wait(f"(() => {{ const t = {ROOT_JS}.querySelector('#lora_trainer_tag_status').innerText;"
              " return t.includes('done') && t.includes('Tagged'); })()", what="second tagging done")
    again = _captions(photos)
    assert all(gone not in tags for tags in again.values()), again
    assert "my own words" in again["shape1"]

    log('3. prepare')
    # Check plan and Train pressed too early: each says what is missing, in the form's words
    page.click("#lora_trainer_plan")
    page.wait_text("#lora_trainer_plan_info", "Training data is empty; prepare the dataset in step 3")
    page.click("#lora_trainer_train")
    page.wait_text("#lora_trainer_train_status", "Training data is empty")
    # 3. prepare: long enough a run to act on it while it trains
    page.fill("lora_trainer_repeats", 25)
    page.fill("lora_trainer_resolution", 64)  # no bucket setting needed below 256 px
    page.click("#lora_trainer_prepare")
    page.wait_text("#lora_trainer_prepare_status", "Prepared")
    assert page.value("lora_trainer_data").endswith("shape")
    page.wait(f"!{page.q('#lora_trainer_plan_info')}.innerText.trim() && "
              f"!{page.q('#lora_trainer_train_status')}.innerText.trim()", what="the old error lines gone")

    log('4. plan')
    # 4. plan and train
    page.fill("lora_trainer_name", "shapes")
    page.fill("lora_trainer_epochs", 4)
    page.fill("lora_trainer_batch_size", 1)
    page.fill("lora_trainer_rank", 4)
    page.fill("lora_trainer_lr", 0.001)
    page.click_text("#lora_trainer_advanced", "Samples and advanced")
    page.fill("lora_trainer_sample_prompt", "shape, circle", commit="")
    page.click("#lora_trainer_plan")
    plan = page.wait_text("#lora_trainer_plan_info", "Total:")
    assert "Model:" in plan and "tiny-sd1 (SD1)" in plan and "Time:" in plan and "600 steps" in plan
    shot(page, "03-plan.png", "#lora_trainer_train_section")
    page.click("#lora_trainer_train")
    page.wait_text("#lora_trainer_run_state", "Training: shapes")
    page.wait(f"/step ([3-9]|\\d\\d+)\\/600/.test({ROOT_JS}.querySelector('#lora_trainer_progress').innerText)",
              what="training past step 3")
    progress = page.text("#lora_trainer_progress")
    assert "it/s" in progress and "ETA" in progress, progress

    log('Train again')
    # Train again while it runs: asked, not queued
    page.click("#lora_trainer_train")
    question = page.wait_text("#lora_trainer_confirm", "A run is already going")
    assert "shapes" in question and page.visible("#lora_trainer_queue_yes")
    shot(page, "04-train-again-asks.png", "#lora_trainer_train_section")
    page.click("#lora_trainer_queue_no")
    page.wait_text("#lora_trainer_train_status", "Not started; shapes goes on")
    page.wait(f"!({ROOT_JS}.querySelector('#lora_trainer_queue_yes')?.offsetParent)", what="question gone")
    assert len(_job_records(work)) == 1

    log('the page opened again')
    # the page opened again mid-run (another tab, a reload): shows the run at once and keeps updating
    other = browser.new_page(base + "/")
    other.wait_text("#lora_trainer_progress", "Running")
    seen = _step(other)
    other.wait(f"(() => {{ const m = /step (\\d+)\\//.exec({ROOT_JS}.querySelector('#lora_trainer_progress')"
               f".innerText); return m && +m[1] > {seen}; }})()", what="the other page keeps updating")
    other.close()
    page.front()
    page.reload()
    page.wait_text("#lora_trainer_progress", "Running")
    page.wait_text("#lora_trainer_run_state", "Training: shapes")

    log('a queued run')
    # a queued run is shown beside the buttons and cancelled there; Stop then acts on the running run
    page.click("#lora_trainer_train")
    page.wait_text("#lora_trainer_confirm", "A run is already going")
    page.click("#lora_trainer_queue_yes")
    page.wait_text("#lora_trainer_run_state", "Queued after it: shapes")
    page.click("#lora_trainer_cancel_queued")
    page.wait_text("#lora_trainer_train_status", "Cancelled 1 queued run(s)")
    page.click("#lora_trainer_stop")
    page.wait_text("#lora_trainer_train_status", "Stopping shapes")
    result = page.wait_text("#lora_trainer_result", "Stopped", timeout=120)
    stop_name = re.search(r"shapes-step\d+", result).group(0)
    stopped_at = int(stop_name.rsplit("step", 1)[1])
    assert (lora_dir / f"{stop_name}.safetensors").is_file()
    assert json.loads((lora_dir / f"{stop_name}.json").read_text())["sd version"] == "SD1"
    assert not (lora_dir / "shapes.safetensors").exists()  # the clean name waits for the finished LoRA
    runs = page.wait_value("lora_trainer_runs", "shapes — stopped at step")
    assert f"step {stopped_at}/600" in runs
    page.wait(f"(() => {{ const m = /epoch (\\d+)\\/4/.exec({ROOT_JS}.querySelector('#lora_trainer_progress')"
              f".innerText); return m && +m[1] === {(stopped_at - 1) // 150 + 1}; }})()",
              what="the epoch its last step showed")
    shot(page, "05-stopped-resumable.png", "#lora_trainer_train_section")

    log('Resume:')
    # Resume: goes on from the stop, the curve from step 1, the finished LoRA gets the chosen name
    page.click("#lora_trainer_resume")
    page.wait_text("#lora_trainer_train_status", f"Resumed shapes from step {stopped_at}")
    page.wait_text("#lora_trainer_progress", "Running")
    # the first sample is drawn after epoch 1 (step 150): the gallery shows it while training goes on
    page.wait(f"{ROOT_JS}.querySelectorAll('#lora_trainer_samples img').length >= 1", timeout=240,
              what="a sample picture")
    page.wait(f"/step (1[6-9]\\d|[2-5]\\d\\d)\\/600/.test({ROOT_JS}.querySelector('#lora_trainer_progress').innerText)",
              timeout=240, what="training on after the sample")
    shot(page, "06-training.png", "#lora_trainer_progress_section")
    page.wait_text("#lora_trainer_result", "LoRA ready: shapes", timeout=240)
    assert (lora_dir / "shapes.safetensors").is_file() and (lora_dir / f"{stop_name}.safetensors").is_file()
    records = _job_records(work)
    resumed = next(r for r in records if r["resumed_from"])
    assert resumed["state"] == "done" and resumed["lora_name"] == "shapes"
    assert [h[0] for h in resumed["loss_history"]] == list(range(1, 601))
    assert "step 600/600" in page.text("#lora_trainer_progress")

    log('Copy prompt')
    # Copy prompt: says what it did; where the browser has no clipboard, selects the prompt instead
    page.wait(f"{ROOT_JS}.querySelector('#lora_trainer_send_text textarea')?.value === '<lora:shapes:0.8> shape'",
              what="prompt text")
    page.click("#lora_trainer_send_to_txt2img")
    note = page.wait_text("#lora_trainer_copy_note", "<lora:shapes:0.8> shape")
    assert note.startswith(("Copied", "Copy this prompt")) or "press Ctrl+C" in note
    page.eval("Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true})")
    page.eval(f"{ROOT_JS}.querySelector('#lora_trainer_copy_note').textContent = ''")
    page.click("#lora_trainer_send_to_txt2img")
    page.wait(f"{ROOT_JS}.querySelector('#lora_trainer_copy_note').textContent.length > 0", what="copy note")
    assert page.eval("window.getSelection().toString()") == "<lora:shapes:0.8> shape"
    shot(page, "07-result.png", "#lora_trainer_progress_section")
    if env_flag("LORA_TRAINER_UPDATE_SCREENSHOTS"):
        page.screenshot(SHOTS / f"tab-gradio{GRADIO}-after-run.png")
    errors = [c for c in page.console if "fonts.googleapis" not in c and "preload" not in c]
    assert not errors, errors


def test_the_tab_inside_a_webui_like_page_follows_the_run(tmp_path):
    """As A1111 and Forge show it: the tab's Blocks rendered into the WebUI's own Blocks, in a tab of its
    Tabs. The page-load events and (Gradio 4) the timer must work from there too, also after a reload
    and with the tab opened only later."""
    import socket

    from train_support import make_dataset

    from lora_trainer.host import StandaloneHost
    from lora_trainer.jobs import JobManager
    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.ui import build_tab, compat

    class WebUIHost(StandaloneHost):
        name = "webui-like"  # not standalone: "Send to txt2img", no checkpoint box

    data = make_dataset(tmp_path / "ds", n=4, repeats=100)
    host = WebUIHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"))
    jobs = JobManager(host, work_dir=tmp_path / "runs")
    tab = build_tab(host, jobs=jobs)
    with gr.Blocks(analytics_enabled=False) as demo, gr.Tabs(elem_id="tabs"):
        with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
            gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
        with gr.TabItem("Train LoRA", id="lora_trainer", elem_id="tab_lora_trainer"):
            tab.render()
    demo.queue(**compat.queue_kwargs(64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_api=False)
    try:
        with chromium() as browser:
            page = browser.new_page(f"http://127.0.0.1:{port}/")
            page.wait(f"!!{ROOT_JS}.querySelector('#tabs')", what="the WebUI-like page")
            assert not page.visible("#lora_trainer_run_state")  # another tab is open first
            page.click_text("#tabs button", "Train LoRA")
            page.wait_text("#lora_trainer_run_state", "Nothing is training")
            assert page.text("#lora_trainer_send_to_txt2img").strip() == "Send to txt2img"
            page.fill("lora_trainer_data", data)
            page.fill("lora_trainer_resolution", 64)
            page.fill("lora_trainer_name", "nested")
            page.click("#lora_trainer_train")
            page.wait(f"/step [1-9]\\d*\\/\\d+/.test({ROOT_JS}.querySelector('#lora_trainer_progress').innerText)",
                      what="training steps shown without a click")
            page.click_text("#tabs button", "txt2img")
            page.click_text("#tabs button", "Train LoRA")
            seen = _step(page)
            page.wait(f"(() => {{ const m = /step (\\d+)\\//.exec({ROOT_JS}.querySelector('#lora_trainer_progress')"
                      f".innerText); return m && +m[1] > {seen}; }})()", what="still updating after switching tabs")
            page.reload()
            page.click_text("#tabs button", "Train LoRA")
            page.wait_text("#lora_trainer_progress", "Running")
            assert page.value("lora_trainer_name") == "nested"  # the form shows what trains
            page.click("#lora_trainer_stop")
            page.wait_text("#lora_trainer_train_status", "Stopping nested")
            page.wait_text("#lora_trainer_result", "Stopped", timeout=120)
            errors = [c for c in page.console if "fonts.googleapis" not in c and "preload" not in c]
            assert not errors, errors
    finally:
        jobs.shutdown()
        # Gradio 3.41's close() can wait forever on a closed page's websocket (`ui` bounds it the same way)
        closer = threading.Thread(target=demo.close, daemon=True)
        closer.start()
        closer.join(10)
