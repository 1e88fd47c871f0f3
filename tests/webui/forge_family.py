"""What the Forge and Forge Neo suites share: one server class with the training, tag/prepare and
package-check steps both hosts go through (full-size SD1.5 on 2 CPU cores: 64 px, rank 4, 2 steps).
"""

from __future__ import annotations

from pathlib import Path

from webui_server import WebUIServer


class ForgeFamilyServer(WebUIServer):
    """A Forge-family WebUI (lllyasviel Forge, Forge Neo) driven through its harness."""

    def train(self, data: str, name: str, **extra) -> dict:
        """A small training run through the API, waited for."""
        body = {"data": data, "name": name, "resolution": 64, "enable_bucket": False, "max_steps": 2, "rank": 4,
                "alpha": 4, "learning_rate": 1e-2, "train_text_encoder": True, **extra}
        return self.wait_job(self.call("POST", "/lora-trainer/v1/train", body)["job_id"])

    def tag_and_prepare(self, data: Path) -> Path:
        """3 generated images tagged by a local WD14-shaped ONNX model (no Hub), then a 64 px dataset."""
        from lora_trainer.dataset.samples import write_images
        from lora_trainer.tagger.demo_model import write_demo_tagger

        raw = data / "photos"
        write_images(raw, 3, (64, 64), captions=False)
        tagger = write_demo_tagger(data / "tagger")
        tag = self.wait_job(self.call("POST", "/lora-trainer/v1/tag", {"data": str(raw), "model": str(tagger),
                                                                     "trigger": "sks"})["job_id"])
        assert tag["state"] == "done", (tag["error"], tag["message"])
        captions = list(raw.glob("*.txt"))
        assert len(captions) == 3 and all(p.read_text().startswith("sks") for p in captions)
        prep = self.wait_job(self.call("POST", "/lora-trainer/v1/prepare", {
            "source": str(raw), "out": str(data / "ds"), "concept": "sks", "repeats": 1, "resolution": 64})["job_id"])
        assert prep["state"] == "done", (prep["error"], prep["message"])
        return data / "ds"

    def changed_packages(self) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        """({name: (before, after)} for installed packages install.py changed, {name: version} it added)."""
        before, after = self.facts["freeze_before"], self.facts["freeze_after"]
        changed = {k: (v, after[k]) for k, v in before.items() if k in after and after[k] != v}
        removed = {k: (v, "") for k, v in before.items() if k not in after}
        return {**changed, **removed}, {k: v for k, v in after.items() if k not in before}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class FluxForgeFamilyServer(ForgeFamilyServer):
    """A Forge-family WebUI holding a Flux model (the Forge main and Neo Flux suites)."""

    def txt2img(self, prompt: str):
        """Flux settings: CFG 1, Euler + Simple (Automatic gives NaN on Flux), 2 steps, 64 px; an RGB array."""
        import base64
        import io

        import numpy as np
        from PIL import Image
        from webui_server import SEED

        res = self.call("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": SEED, "steps": 2, "width": 64, "height": 64,
            "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 1, "batch_size": 1, "n_iter": 1})
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB"))
        assert image.std() > 0, f"{self.label} made a constant image"
        return image

    def lora_lines(self, stem: str, since: int = 0) -> list[str]:
        """The console's [LORA] lines about `stem`.safetensors, from log offset `since`."""
        return [ln.strip() for ln in self.log_text()[since:].splitlines()
                if "[LORA]" in ln and f"{stem}.safetensors" in ln]
