"""The CLI's `train` imports diffusers' and transformers' model zoos lean (lean_imports.py): only the modules a run
uses, the same classes, the same weights, the same LoRA. Each check runs in a fresh process: the finder is
process-wide (and `cli.main(argv)` from a caller, as in the other CLI tests, never installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file
from train_support import make_dataset

from lora_trainer.lean_imports import LEAN_PACKAGES

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _weights(ckpt: str) -> str:
    """Code printing (as JSON) each loaded module's class and a hash of its weights, and tokenizer ids."""
    return textwrap.dedent(f"""
        import hashlib, json
        from lora_trainer.models.loader import load_model

        bundle = load_model({ckpt!r}, dtype=None, device=None)
        digest = {{}}
        parts = [("unet", bundle.unet), ("vae", bundle.vae)] + [(f"te{{i}}", te) for i, te in
                                                                enumerate(bundle.text_encoders)]
        for part, module in parts:
            h = hashlib.sha256()
            for key, tensor in sorted(module.state_dict().items()):
                h.update(key.encode())
                h.update(str(tensor.dtype).encode())
                h.update(tensor.detach().float().contiguous().numpy().tobytes())
            digest[part] = [type(module).__module__, type(module).__name__, h.hexdigest()]
        digest["tokens"] = bundle.tokenizers[0]("a photo of a cat").input_ids
    """)


def test_lean_zoos_load_the_same_modules_and_weights(tmp_path):
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = str(write_tiny_checkpoint(tmp_path, "sd1", seed=3))
    before = textwrap.dedent("""
        import sys
        from lora_trainer.lean_imports import LEAN_PACKAGES, is_lean, lean_model_zoos
        assert lean_model_zoos() == list(LEAN_PACKAGES), [n for n in LEAN_PACKAGES if n in sys.modules]
        assert lean_model_zoos() == []  # once per process
    """)
    after = textwrap.dedent("""
        lean = [n for n in LEAN_PACKAGES if is_lean(sys.modules[n])]
        zoo = ["diffusers.models.unets.unet_1d", "diffusers.models.unets.unet_3d_condition",
               "diffusers.models.autoencoders.vq_model", "transformers.models.bert"]
        print(json.dumps({"digest": digest, "lean": lean, "zoo": [m for m in zoo if m in sys.modules]}))
    """)
    lean = json.loads(_python(before + _weights(ckpt) + after))
    plain = json.loads(_python(_weights(ckpt) + "\nprint(json.dumps(digest))\n"))
    assert lean["digest"] == plain
    assert lean["lean"] == list(LEAN_PACKAGES) and lean["zoo"] == []


def test_names_of_a_lean_package_still_resolve():
    out = _python("""
        import sys
        from lora_trainer.lean_imports import is_lean, lean_model_zoos
        lean_model_zoos()
        from diffusers import AutoencoderKL, UNet2DConditionModel
        import diffusers.models.unets as unets
        import transformers.models as models
        from transformers.models import clip  # a submodule: the package's __init__ still not run
        from transformers import CLIPTextModel
        still_lean = is_lean(unets) and "diffusers.models.unets.unet_1d" not in sys.modules
        assert clip.modeling_clip.CLIPTextModel is CLIPTextModel
        from diffusers.models.unets import UNet2DConditionModel as by_package  # defined by the __init__: runs it
        from diffusers.models.unets import *  # noqa: F403
        from diffusers.models.autoencoders import AutoencoderKL as vae
        assert by_package is UNet2DConditionModel and vae is AutoencoderKL
        assert UNet1DModel is unets.UNet1DModel and "diffusers.models.unets.unet_1d" in sys.modules  # noqa: F405
        assert models.bert.__name__ == "transformers.models.bert"  # a submodule not imported yet, as an attribute
        try:
            unets.NoSuchModel
        except AttributeError as e:
            missing = "NoSuchModel" in str(e)
        print(still_lean, missing, is_lean(models))
    """)
    assert out == "True True True"


def test_a_package_imported_before_is_left_alone():
    out = _python("""
        import diffusers.models.unets
        from lora_trainer.lean_imports import LEAN_PACKAGES, is_lean, lean_model_zoos
        taken = lean_model_zoos()
        print("diffusers.models.unets" not in taken, not is_lean(diffusers.models.unets), len(taken) < len(LEAN_PACKAGES))
    """)
    assert out == "True True True"


def test_cli_train_in_its_own_process_gives_the_same_lora(tmp_path):
    """The CLI's own process (lean zoos) and `cli.main(argv)` (not lean) train the same LoRA from one file."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path, "sd1", seed=1)
    data = make_dataset(tmp_path / "d", n=2)
    args = ["train", "--model", str(ckpt), "--data", str(data), "--name", "lean", "--resolution", "64",
            "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32", "--rank", "4",
            "--device", "cpu", "--max-steps", "2", "--seed", "5", "--validate-every-n-epochs", "0",
            "--save-precision", "float"]
    runs = {}
    for label, own in (("own", True), ("caller", False)):
        out = tmp_path / label
        lean = _python(f"""
            import sys
            from lora_trainer import cli
            argv = {[*args, "--out", str(out)]!r}
            if {own!r}:
                sys.argv = ["lora_trainer", *argv]
                rc = cli.main()
            else:
                rc = cli.main(argv)
            from lora_trainer.lean_imports import is_lean
            print(rc, is_lean(sys.modules["diffusers.models.unets"]))
        """)
        runs[label] = (lean, load_file(str(out / "lean.safetensors")))
    assert runs["own"][0] == "0 True" and runs["caller"][0] == "0 False"
    own, caller = runs["own"][1], runs["caller"][1]
    assert own.keys() == caller.keys() and len(own) > 0
    assert all(own[k].dtype == caller[k].dtype and own[k].equal(caller[k]) for k in own)
