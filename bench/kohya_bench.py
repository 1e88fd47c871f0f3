#!/usr/bin/env python3
"""Time kohya sd-scripts' train_network.py (SD1.5, random weights) with the same settings as
bench/speed.py, for a side-by-side ratio from one GPU run.

Nothing of sd-scripts is in this repository: pass a checkout of it (--sd-scripts, commit 48d368fa
was used) and the folder holding the shared timing tools `kohya_prep.py` (random LDM checkpoint +
random captioned PNGs, through sd-scripts' own functions) and `kohya_timed.py` (runs
train_network in-process and timestamps every step). sd-scripts needs its own package versions
(diffusers 0.32.1, transformers 4.54.1, tokenizers 0.21, huggingface-hub 0.34.3, accelerate
1.6.0, toml, voluptuous, imagesize): install them into a separate folder and pass it as --site; it
goes first on PYTHONPATH for the kohya processes only.

The CLIP tokenizer folder sd-scripts wants (--tokenizer_cache_dir, no Hub here) is written from
this package's bundled vocab.json/merges.txt (the same OpenAI BPE vocabulary).

Usage: python bench/kohya_bench.py --sd-scripts DIR --tools DIR [--site DIR] [--batches 1,8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = os.path.join(HERE, "..", "lora_trainer", "models", "tokenizer")


def write_tokenizer(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(TOKENIZER_FILES, name), os.path.join(folder, name))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                       errors="replace", add_prefix_space=False), f)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sd-scripts", required=True)
    p.add_argument("--tools", required=True, help="folder with kohya_prep.py and kohya_timed.py")
    p.add_argument("--site", default="", help="folder with sd-scripts' package versions (PYTHONPATH first)")
    p.add_argument("--work", default="/tmp/kohya_work")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", default="60,30", help="max_train_steps per batch size")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "kohya.json"))
    a = p.parse_args()
    sd, tools, work = (os.path.abspath(x) for x in (a.sd_scripts, a.tools, a.work))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if a.site:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (os.path.abspath(a.site), env.get("PYTHONPATH", "")) if x)
    os.makedirs(work, exist_ok=True)
    write_tokenizer(os.path.join(work, "tok", "openai_clip-vit-large-patch14"))
    res: dict = {"command": " ".join(sys.argv), "runs": []}
    t = time.time()
    ckpt = os.path.join(work, "sd15_random.safetensors")
    if not os.path.exists(ckpt):
        subprocess.run([sys.executable, os.path.join(tools, "kohya_prep.py"), work, str(a.images), "512", "cuda"],
                       cwd=sd, env=env, check=True)
    res["prep_s"] = round(time.time() - t, 1)
    probe = ("import json, accelerate, diffusers, torch, transformers; print(json.dumps(dict("
             "diffusers=diffusers.__version__, transformers=transformers.__version__, "
             "accelerate=accelerate.__version__, torch=torch.__version__)))")
    ver = subprocess.run([sys.executable, "-c", probe], check=False, cwd=sd, env=env, capture_output=True, text=True)
    res["versions"] = ver.stdout.strip()
    steps = dict(zip(a.batches.split(","), a.steps.split(",")))
    for bs in a.batches.split(","):
        out_json = os.path.join(work, f"kohya_bs{bs}.json")
        targs = ["--pretrained_model_name_or_path", ckpt, "--train_data_dir", os.path.join(work, "data"),
                 "--output_dir", os.path.join(work, f"out_bs{bs}"), "--output_name", "kohya",
                 "--resolution", "512,512", "--train_batch_size", bs, "--max_train_steps", steps.get(bs, "30"),
                 "--learning_rate", "1e-4", "--seed", "0", "--save_model_as", "safetensors",
                 "--caption_extension", ".txt", "--tokenizer_cache_dir", os.path.join(work, "tok"),
                 "--mixed_precision", "bf16", "--sdpa", "--cache_latents", "--network_train_unet_only",
                 "--network_module", "networks.lora", "--network_dim", "32", "--network_alpha", "16",
                 "--optimizer_type", "AdamW", "--max_data_loader_n_workers", "1"]
        t = time.time()
        proc = subprocess.run([sys.executable, os.path.join(tools, "kohya_timed.py"), out_json, "--", *targs],
                              check=False, cwd=sd, env=env, capture_output=True, text=True)
        rec: dict = {"bs": int(bs), "rc": proc.returncode, "wall_s": round(time.time() - t, 1)}
        if os.path.exists(out_json):
            with open(out_json) as f:
                rec.update(json.load(f))
            rec.pop("args", None)
            if rec.get("it_per_s"):
                rec["img_per_s"] = round(rec["it_per_s"] * int(bs), 2)
        if proc.returncode or not rec.get("it_per_s"):
            rec["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        res["runs"].append(rec)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"kohya bs={bs}: {rec.get('it_per_s')} it/s, {rec.get('img_per_s')} img/s, peak "
              f"{rec.get('peak_alloc_GiB')} GiB, first step at {rec.get('first_step_at_s')} s, rc {proc.returncode}",
              flush=True)
        if rec.get("log_tail"):
            print(rec["log_tail"][-1500:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
