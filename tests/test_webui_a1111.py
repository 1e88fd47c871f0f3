"""The A1111 adapter's host services without a WebUI.

Real: FastAPI (TestClient) with our router and the `--api-auth` dependency, Gradio Blocks where
Gradio is installed, the tiny checkpoint and `load_model` for the fp8 fallback, torch tensors.
Stand-ins (they only exist inside a running WebUI): `modules.shared` / `modules.devices` /
`modules.script_callbacks` / `modules.call_queue`, built from SimpleNamespace with the attribute
names A1111 1.10 uses (`shared.state` mirrors modules.shared_state.State). The real ones are
exercised by the opt-in suite in tests/webui/.
"""

from __future__ import annotations

import json
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_trainer.errors import UnsupportedModelError
from lora_trainer.webui import common
from lora_trainer.webui.a1111 import A1111Host, reuse_blocker


class _State:
    """The fields of A1111's modules.shared_state.State that we touch."""

    def __init__(self) -> None:
        self.job = ""
        self.job_count = self.job_no = self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = self.skipped = False
        self.begun = self.ended = 0

    def begin(self, job: str = "(unknown)") -> None:
        self.job, self.interrupted, self.skipped = job, False, False
        self.begun += 1

    def end(self) -> None:
        self.ended += 1


@pytest.fixture()
def fake_webui(monkeypatch, tmp_path):
    """`modules.*` stand-ins in sys.modules for the duration of one test."""
    modules = types.ModuleType("modules")
    shared = SimpleNamespace(state=_State(), opts=SimpleNamespace(data={}, CLIP_stop_at_last_layers=1),
                             cmd_opts=SimpleNamespace(lora_dir=str(tmp_path / "Lora"), api_auth=None, listen=False,
                                                      share=False, ngrok=None, server_name=None,
                                                      enable_insecure_extension_access=False),
                             models_path=str(tmp_path / "models"), sd_model=None)
    devices = SimpleNamespace(device=torch.device("cpu"), fp8=False)
    call_queue = SimpleNamespace(queue_lock=threading.Lock())
    paths_internal = SimpleNamespace(data_path=str(tmp_path), models_path=str(tmp_path / "models"))
    callbacks: dict[str, list] = {}

    def _recorder(name):
        return lambda fn: callbacks.setdefault(name, []).append(fn)

    script_callbacks = SimpleNamespace(**{name: _recorder(name)
                                          for name in ("on_ui_tabs", "on_ui_settings", "on_app_started")})
    for name, mod in {"shared": shared, "devices": devices, "call_queue": call_queue,
                      "paths_internal": paths_internal, "script_callbacks": script_callbacks}.items():
        setattr(modules, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "modules", modules)
    return SimpleNamespace(shared=shared, devices=devices, call_queue=call_queue, callbacks=callbacks, tmp=tmp_path)


# ---------------------------------------------------------------------- paths and auth
def _opts(**kw):
    base = {"listen": False, "share": False, "ngrok": None, "server_name": None,
            "enable_insecure_extension_access": False, "lora_dir": None}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, restricted", [
    ({}, False), ({"server_name": "127.0.0.1"}, False), ({"server_name": "localhost"}, False),
    ({"server_name": "::1"}, False), ({"listen": True}, True), ({"share": True}, True),
    ({"server_name": "0.0.0.0"}, True), ({"server_name": "my-box.lan"}, True),
    ({"listen": True, "enable_insecure_extension_access": True}, False),
])
def test_paths_are_restricted_only_beyond_loopback(kw, restricted, tmp_path):
    roots = common.allowed_roots_for(_opts(lora_dir=str(tmp_path / "L"), **kw), tmp_path, ["/srv/data", " "])
    if not restricted:
        assert roots is None
    else:
        assert roots == [tmp_path.resolve(), (tmp_path / "L").resolve(), Path("/srv/data").resolve()]


def test_extra_roots_setting_accepts_lines_commas_and_lists():
    assert common.split_roots("/a\n/b, /c\n\n") == ["/a", "/b", "/c"]
    assert common.split_roots(["/a", " ", "/b"]) == ["/a", "/b"]


def test_api_auth_dependency_enforces_the_webuis_credentials(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from lora_trainer.api import create_app
    from lora_trainer.host import StandaloneHost

    assert common.api_auth_dependency(_opts(api_auth=None)) is None
    auth = common.api_auth_dependency(_opts(api_auth="alice:s3cret,bob:pw:with:colons"))
    client = TestClient(create_app(StandaloneHost(tmp_path / "Lora"), auth=auth))
    assert client.get("/lora-trainer/v1/status").status_code == 401
    assert client.get("/lora-trainer/v1/status", auth=("alice", "wrong")).status_code == 401
    assert client.get("/lora-trainer/v1/status", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/lora-trainer/v1/status", auth=("bob", "pw:with:colons")).status_code == 200


def test_install_refusal_is_read_back(tmp_path):
    status = tmp_path / "s.json"
    assert common.disabled_reason(status) is None
    status.write_text(json.dumps({"ok": False, "message": "pip cannot add diffusers"}))
    assert common.disabled_reason(status) == "pip cannot add diffusers"
    status.write_text(json.dumps({"ok": True, "message": "all packages present"}))
    assert common.disabled_reason(status) is None


def test_tensor_fingerprint_compares_across_devices_with_like():
    t = torch.randn(1000).half()
    before = common.tensor_fingerprint({"w": t})
    as_sums = common.tensor_fingerprint({"w": t}, like={"w": "sum:0"})  # as if taken on a GPU
    assert before["w"].startswith("sha256:") and as_sums["w"].startswith("sum:")
    assert common.tensor_fingerprint({"w": t}, like=as_sums) == as_sums
    assert common.tensor_fingerprint({"w": t}, like=before) == before


def test_tensor_fingerprint_sees_a_one_bit_change_in_any_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.linspace(-1, 1, 17).to(dtype)
        before = common.tensor_fingerprint({"w": t, "scalar": torch.tensor(3.0, dtype=dtype)})
        t.view(torch.int16 if dtype != torch.float32 else torch.int32)[5] ^= 1
        after = common.tensor_fingerprint({"w": t, "scalar": torch.tensor(3.0, dtype=dtype)})
        assert before["w"] != after["w"] and before["scalar"] == after["scalar"]


@pytest.mark.parametrize("chunk", [None, 7])  # one chunk; many chunks with a short last one
def test_device_checksum_exact_and_sensitive(monkeypatch, chunk):
    # The GPU digest's arithmetic runs on any device; here on the CPU (no GPU in CI).
    if chunk:
        monkeypatch.setattr(common, "_CHUNK_WORDS", chunk)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, generator=g).to(torch.bfloat16)
    whole = common._device_checksum(t.view(torch.uint8)).tolist()
    assert common._device_checksum(t.clone().view(torch.uint8)).tolist() == whole
    flipped = t.clone()
    flipped.view(torch.int16)[321] ^= 1 << 9
    assert common._device_checksum(flipped.view(torch.uint8)).tolist() != whole
    swapped = t.clone().view(torch.int32)
    swapped[[3, 200]] = swapped[[200, 3]]  # same words, other places: only the weighted sum sees it
    swapped_sum = common._device_checksum(swapped.view(torch.uint8)).tolist()
    assert swapped_sum[1] == whole[1] and swapped_sum[2] != whole[2]
    odd = torch.arange(13, dtype=torch.uint8)[1:]  # 12 bytes at storage offset 1: padded copy
    assert common._device_checksum(odd).tolist()[0] == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensor_fingerprint_on_the_gpu_matches_the_cpu_and_sees_a_flip():
    t = torch.randn(3, 1 << 20, device="cuda").half()
    before = common.tensor_fingerprint({"w": t, "odd": t[0, 1:8]})
    assert before == common.tensor_fingerprint({"w": t, "odd": t[0, 1:8]})
    assert before["w"].startswith("sum:") and before == common.tensor_fingerprint({"w": t, "odd": t[0, 1:8]})
    moved = {"w": t.cpu(), "odd": t[0, 1:8].cpu()}  # the host moved them to the CPU meanwhile
    assert common.tensor_fingerprint(moved)["w"].startswith("sha256:")
    assert common.tensor_fingerprint(moved, like=before) == before
    t.view(torch.int16)[2, 12345] ^= 1
    assert common.tensor_fingerprint({"w": t})["w"] != before["w"]


# ---------------------------------------------------------------------- host services
def test_progress_goes_to_shared_state_and_interrupt_stops(fake_webui):
    host = A1111Host()
    host._begin_state("Training a LoRA")
    st = fake_webui.shared.state
    host.report(SimpleNamespace(kind="step", step=30, total_steps=120, epoch=2, total_epochs=4, loss=0.12,
                                smoothed_loss=0.1, eta_s=125))
    # A1111's bar: job_no/job_count + sampling_step/sampling_steps/job_count = 30/120
    assert (st.sampling_step, st.sampling_steps, st.job_no, st.job_count) == (30, 120, 0, 1)
    assert st.textinfo == "LoRA Trainer, step 30/120, epoch 2/4, loss 0.1000, ETA 2:05"
    host.report(SimpleNamespace(kind="cache", message="Caching latents: 12/40 images"))
    assert st.textinfo == "LoRA Trainer, Caching latents: 12/40 images"
    assert host.interrupted() is False
    st.interrupted = True  # the WebUI's Interrupt button
    assert host.interrupted() is True
    st.interrupted, st.skipped = False, True
    assert host.interrupted() is True
    host._end_state()
    assert host.interrupted() is False  # an Interrupt meant for a later txt2img is not ours
    assert st.ended == 1


def test_lora_dir_lock_and_roots_come_from_the_webui(fake_webui):
    host = A1111Host(settings={"lora_trainer_extra_roots": "/srv/extra"})
    assert host.lora_dir() == Path(fake_webui.shared.cmd_opts.lora_dir)
    assert host.gpu_lock() is fake_webui.call_queue.queue_lock
    assert host.allowed_roots() is None
    fake_webui.shared.cmd_opts.listen = True
    assert Path("/srv/extra").resolve() in host.allowed_roots()


def test_reuse_blockers():
    unet = torch.nn.Linear(2, 2)
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    assert reuse_blocker(model, fp8=False, device="cpu") is None
    assert "fp8" in reuse_blocker(model, fp8=True, device="cpu")
    unet.half()
    assert "--no-half" in reuse_blocker(model, fp8=False, device="cpu")
    assert reuse_blocker(model, fp8=False, device="cuda") is None
    with pytest.raises(UnsupportedModelError, match="SD3"):
        reuse_blocker(SimpleNamespace(is_sd3=True), fp8=False, device="cpu")
    assert reuse_blocker(None, fp8=False, device="cpu") == "no model is loaded"


def test_fp8_storage_falls_back_to_the_checkpoint_file(fake_webui, capsys):
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(fake_webui.tmp / "ckpt", "sd1", seed=2)
    fake_webui.devices.fp8 = True
    fake_webui.shared.sd_model = SimpleNamespace(
        model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)),
        sd_checkpoint_info=SimpleNamespace(filename=str(ckpt), model_name="tiny"))
    host = A1111Host()
    bundle = host.acquire_model(SimpleNamespace())
    try:
        assert bundle.family.label == "SD1"
        assert "loading tiny-sd1.safetensors from disk instead" in capsys.readouterr().out
        assert fake_webui.shared.state.begun == 1
    finally:
        host.release_model(bundle)
    assert fake_webui.shared.state.ended == 1


def test_lora_list_refresh_uses_the_builtin_extension(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "networks", SimpleNamespace(list_available_networks=lambda: calls.append(1)))
    A1111Host().after_save(tmp_path / "x.safetensors")
    assert calls == [1]
    monkeypatch.delitem(sys.modules, "networks")
    A1111Host().after_save(tmp_path / "x.safetensors")  # no Lora extension: nothing to refresh, no error


# ---------------------------------------------------------------------- registration
@pytest.fixture()
def fresh_registration(monkeypatch):
    from lora_trainer import webui

    monkeypatch.setattr(webui, "_registered", {})
    return webui


def test_register_adds_tab_settings_and_api(fake_webui, fresh_registration, monkeypatch, tmp_path):
    webui = fresh_registration
    monkeypatch.setattr(webui, "disabled_reason", lambda: None)
    monkeypatch.setattr(webui, "import_all", lambda: None)
    fake_webui.shared.cmd_opts.api_auth = "u:p"
    webui.register()
    cbs = fake_webui.callbacks
    assert set(cbs) == {"on_ui_tabs", "on_ui_settings", "on_app_started"}
    host = webui._registered["host"]
    assert isinstance(host, A1111Host)
    fake_webui.shared.opts.data["lora_trainer_ab_steps"] = 7
    assert host.settings.get("lora_trainer_ab_steps") == 7  # settings are read live
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    cbs["on_app_started"][0](None, app)
    client = TestClient(app)
    assert client.get("/lora-trainer/v1/status").status_code == 401
    body = client.get("/lora-trainer/v1/status", auth=("u", "p")).json()
    assert body["host"] == "a1111"
    gr = pytest.importorskip("gradio")
    tabs = cbs["on_ui_tabs"][0]()
    assert len(tabs) == 1 and tabs[0][1:] == ("Train LoRA", "lora_trainer")
    assert isinstance(tabs[0][0], gr.Blocks)


def test_register_shows_why_when_install_refused(fake_webui, fresh_registration, monkeypatch, capsys):
    webui = fresh_registration
    monkeypatch.setattr(webui, "disabled_reason", lambda: "pip cannot add diffusers without changing numpy")
    webui.register()
    assert "LoRA Trainer is disabled: pip cannot add diffusers" in capsys.readouterr().out
    assert set(fake_webui.callbacks) == {"on_ui_tabs"}  # no API, no settings; the WebUI starts normally
    gr = pytest.importorskip("gradio")
    blocks, label, tab_id = fake_webui.callbacks["on_ui_tabs"][0]()[0]
    assert (label, tab_id) == ("Train LoRA", "lora_trainer") and isinstance(blocks, gr.Blocks)


def _module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state_dict has exactly these checkpoint keys (stands in for LatentDiffusion;
    the real LDM classes are used in test_webui_a1111_ldm.py)."""
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if tensor.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            mod.register_buffer(leaf, tensor)
    return root


def test_lowvram_keeps_the_webuis_model_on_the_cpu_and_trains_on_a_unet_copy(fake_webui, monkeypatch):
    from safetensors.torch import load_file

    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(fake_webui.tmp / "ckpt", "sd1", seed=4)
    sd_model = _module_tree(load_file(str(ckpt)))
    sd_model.lowvram, sd_model.is_sd1, sd_model.used_config = True, True, str(ckpt.with_suffix(".yaml"))
    sd_model.sd_checkpoint_info = SimpleNamespace(filename=str(ckpt), model_name="tiny")
    fake_webui.shared.sd_model = sd_model
    calls = []
    lowvram = SimpleNamespace(send_everything_to_cpu=lambda: calls.append("park"))
    sd_models = SimpleNamespace(send_model_to_device=lambda m: calls.append("back"))
    for name, mod in {"lowvram": lowvram, "sd_models": sd_models}.items():
        setattr(sys.modules["modules"], name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    # "meta" plays the GPU: a UNet copy "on the GPU" must leave the WebUI's tensors where they are
    fake_webui.devices.device = torch.device("meta")
    before = common.tensor_fingerprint(sd_model.state_dict())
    host = A1111Host()
    bundle = host.acquire_model(SimpleNamespace())
    assert calls == ["park"]
    assert all(p.is_meta for p in bundle.unet.parameters())
    assert not any(p.is_meta for p in bundle.vae.parameters())  # VAE/TE stay zero-copy on the CPU
    assert all(t.device.type == "cpu" for t in sd_model.state_dict().values())
    host.release_model(bundle)
    assert calls == ["park", "back"]
    assert common.tensor_fingerprint(sd_model.state_dict()) == before


def test_model_info_reads_the_loaded_model_without_loading_one(fake_webui, monkeypatch):
    """The tab's "Model: ..." line: A1111's shared.sd_model would load a model on first access."""
    from lora_trainer.webui.a1111 import A1111Host

    sd_models = SimpleNamespace(model_data=SimpleNamespace(sd_model=None))
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    sys.modules["modules"].sd_models = sd_models
    fake_webui.shared.opts.sd_model_checkpoint = "dreamshaper_8.safetensors [879db523c3]"
    host = A1111Host()
    assert host.model_info() == {"name": "dreamshaper_8.safetensors [879db523c3]", "family": None,
                                 "note": "the WebUI loads it when training starts"}
    sd_models.model_data.sd_model = SimpleNamespace(
        is_sdxl=True, sd_checkpoint_info=SimpleNamespace(filename="/m/sd_xl_base_1.0.safetensors"))
    assert host.model_info() == {"name": "sd_xl_base_1.0.safetensors", "family": "SDXL"}


def test_the_ab_grid_shows_its_progress_in_the_job(fake_webui, monkeypatch, tmp_path):
    """The before/after grid runs after training: the tab shows it as a phase with a count, not a
    frozen "done" display (the WebUI's txt2img stands in here: modules.processing is faked)."""
    from PIL import Image

    from lora_trainer.jobs import Job
    from lora_trainer.webui.a1111 import A1111Host

    seen = []
    job = Job(id="j", kind="train", label="train x", lora_name="x", message="Done.")

    class Txt2Img:
        def __init__(self, **kw):
            self.prompt = kw["prompt"]

        def close(self):
            pass

    def process_images(p):
        seen.append((job.phase, job.phase_done, job.phase_total, job.message))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), "gray")])

    processing = SimpleNamespace(StableDiffusionProcessingTxt2Img=Txt2Img, process_images=process_images)
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    sys.modules["modules"].processing = processing
    final = tmp_path / "Lora" / "x.safetensors"
    final.parent.mkdir()
    final.write_bytes(b"lora")
    job.outputs = [str(final)]
    host = A1111Host(settings={"lora_trainer_ab_grid": True, "lora_trainer_ab_steps": 2})
    host.after_run(job)
    assert [s[:3] for s in seen] == [("grid", i, 4) for i in range(4)]  # no LoRA, then 3 strengths
    assert seen[1][3] == "Making the before/after grid with the WebUI: picture 1/4"
    assert job.phase == "" and job.message == "Done." and job.outputs[-1].endswith(".ab-grid.png")
