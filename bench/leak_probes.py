"""Candidate leakage measures vs what the LoRAs draw (shape classifier, other-shape prompts), demo model.

OMP_NUM_THREADS=1 python bench/leak_probes.py N LORA.safetensors...   # N generations per prompt set (0: none)
Pure-noise probes (16, timesteps 999-650) scored with each training caption with and without the trigger,
the empty caption and the trigger alone; the LoRA loaded with lora.applied_lora. Results:
bench/results/learn_thresholds_demo_cpu.md, section "Leakage".
"""
# ruff: noqa
"""Classifier star rates on other-shape prompts + candidate leakage measures, per LoRA file."""
import sys, json, time
from pathlib import Path
import torch
from lora_trainer.demo import DEMO_MODEL
from lora_trainer.demo.classifier import train_classifier
from lora_trainer.demo.measure import generate_batch
from lora_trainer.demo.world import SEEN_SHAPES, HELD_OUT, sample_scenes
from lora_trainer.lora import applied_lora
from lora_trainer.models.loader import load_model
from lora_trainer.train.text import encode_captions

torch.manual_seed(0)
bundle = load_model(DEMO_MODEL, dtype=torch.float32)
clf_path = Path("/tmp/leak/clf.pt")
if clf_path.exists():
    clf = torch.load(clf_path, weights_only=False)
else:
    clf = train_classifier(steps=300, batch=64); torch.save(clf, clf_path)
N = int(sys.argv[1]); files = sys.argv[2:]
other = sample_scenes(N, torch.Generator().manual_seed(11), shapes=SEEN_SHAPES).captions()
starp = sample_scenes(N, torch.Generator().manual_seed(12), shapes=(HELD_OUT,)).captions(shape_word="demostar")
# training captions (for the measures): the dataset's
caps = [p.read_text().strip() for p in sorted(Path("/tmp/leak/work/dataset").rglob("*.txt"))]
import re
plain = [re.sub(r"\s+", " ", c.replace("demostar", "")).replace(" ,", ",").strip() for c in caps]
print("caption e.g.", caps[0], "|", plain[0])
alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
g = torch.Generator().manual_seed(5)
P = 16
noise = torch.randn(P, 4, 16, 16, generator=g)
lat_ids = [k % len(caps) for k in range(P)]
ts_hi = torch.tensor([999, 950, 900, 850, 800, 750, 700, 650] * 2)[:P]
eps2 = torch.randn(P, 4, 16, 16, generator=g)

@torch.no_grad()
def preds():
    out = {}
    unet = bundle.unet
    def run(x, t, texts):
        h, _ = encode_captions(bundle, texts)
        return unet(x, t, encoder_hidden_states=h).sample
    c_trig = [caps[i] for i in lat_ids]; c_plain = [plain[i] for i in lat_ids]
    out["noise_trig"] = run(noise, ts_hi, c_trig)
    out["noise_plain"] = run(noise, ts_hi, c_plain)
    out["noise_empty"] = run(noise, ts_hi, [""] * P)
    out["noise_word"] = run(noise, ts_hi, ["demostar"] * P)
    return out

def cmp(a, b, key):
    return float(((a[key] - b[key]) ** 2).mean())

def cos(a, b, k1, k2):
    d1 = (a[k1] - b[k1]).flatten(1); d2 = (a[k2] - b[k2]).flatten(1)
    return float((d1 * d2).sum() / (d1.norm() ** 2 + 1e-12))

res = {}
base = preds()
@torch.no_grad()
def stars(prompts):
    return clf.fraction(generate_batch(bundle, prompts, seed=100, steps=12), HELD_OUT)
for f in ["base"] + files:
    t = time.time()
    with applied_lora(bundle, None if f == "base" else f):
        r = {"star_other": stars(other), "star_trig": stars(starp)} if N else {}
        if f != "base":
            p = preds()
            w = ((1 - alphas[ts_hi]) / alphas[ts_hi]).view(-1, 1, 1, 1)
            def m(key, sel=slice(None), x0=False):
                d = (p[key] - base[key]) ** 2
                if x0: d = d * w
                return float(d[sel].mean())
            hi = ts_hi >= 900; mid = ts_hi < 900
            for x0 in (False, True):
                sfx = "_x0" if x0 else ""
                r["plain" + sfx] = m("noise_plain", x0=x0) / m("noise_trig", x0=x0)
                r["empty" + sfx] = m("noise_empty", x0=x0) / m("noise_trig", x0=x0)
            r["plain_hi"] = m("noise_plain", hi) / m("noise_trig", hi)
            r["plain_mid"] = m("noise_plain", mid) / m("noise_trig", mid)
            r["empty_hi"] = m("noise_empty", hi) / m("noise_trig", hi)
            r["plain_half1"] = m("noise_plain", slice(0, 8)) / m("noise_trig", slice(0, 8))
            r["plain_half2"] = m("noise_plain", slice(8, 16)) / m("noise_trig", slice(8, 16))
            r["d_trig"] = m("noise_trig")
            def closure(k_off, k_on, base_on=None, x0=False, sel=slice(None)):
                a = base[k_off][sel]; c = p[k_off][sel]; b = p[k_on][sel]
                ww = w[sel] if x0 else torch.ones_like(w[sel])
                return float(((c - a) * (b - a) * ww).sum() / (((b - a) ** 2) * ww).sum())
            r["cl_plain"] = closure("noise_plain", "noise_trig")
            r["cl_empty_word"] = closure("noise_empty", "noise_word")
            r["cl_plain_x0"] = closure("noise_plain", "noise_trig", x0=True)
            r["cl_empty_word_x0"] = closure("noise_empty", "noise_word", x0=True)
            r["cl_plain_h1"] = closure("noise_plain", "noise_trig", sel=slice(0, 8))
            r["cl_plain_h2"] = closure("noise_plain", "noise_trig", sel=slice(8, 16))
            r["cl_ew_h1"] = closure("noise_empty", "noise_word", sel=slice(0, 8))
            r["cl_ew_h2"] = closure("noise_empty", "noise_word", sel=slice(8, 16))
            r = {k: v for k, v in r.items() if k.startswith("cl") or k in ("plain", "empty", "star_other")}
    res[f] = r
    print(f, {k: round(v, 4) for k, v in r.items()}, round(time.time() - t), "s", flush=True)
