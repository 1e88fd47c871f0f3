"""The report's best-epoch pick against the last epoch, from bench/read_demo_lora.py --each's lines: per reading and pooled,
star share, asked share and their product (star share × asked share) of each file with binomial / delta-method
errors, and the difference pick − last with its paired standard error and paired bootstrap 95% interval (10,000
resamples over generations: star prompts and other prompts resampled independently, each generation's pick and
last-epoch results kept together) beside the unpaired error.

The log: one line per job, `{"job": "train-NAME", ...} {reg_leak_demo.py's line}` and
`{"job": "read-NAME" | "read2-NAME", ...} {read_demo_lora.py --each's line}` (the last epoch's file, `NAME.safetensors`, and
one or more kept epochs' files, `NAME-0000EE.safetensors`: each is compared with the last, its epoch taken from
the file name); other jobs (a base model's reading) are skipped.

    python bench/pick_vs_last.py RUNS.log [--json | --md]

Results: bench/results/demo_lora_cpu/best_epoch_second_model_product.md.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys

from pick_rules import scored_epochs

B = 10000


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def sd(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def stats(last: dict, pick: dict, seed: int) -> dict:
    rng = random.Random(seed)
    ls, ps, la, pa = ([int(c) for c in d[k]] for d, k in ((last, "star_each"), (pick, "star_each"),
                                                          (last, "asked_each"), (pick, "asked_each")))
    ns, na = len(ls), len(la)
    out: dict = {}
    for name, (s_, a_) in (("last", (ls, la)), ("pick", (ps, pa))):
        st, a = sum(s_) / ns, sum(a_) / na
        out[name] = {"star": st, "se_star": se(st, ns), "asked": a, "se_asked": se(a, na), "prod": st * a,
                     "se_prod": math.sqrt((a * se(st, ns)) ** 2 + (st * se(a, na)) ** 2)}
    d_s, d_a, d_p = [], [], []
    for _ in range(B):
        i = [rng.randrange(ns) for _ in range(ns)]
        j = [rng.randrange(na) for _ in range(na)]
        s1, s0 = sum(ps[k] for k in i) / ns, sum(ls[k] for k in i) / ns
        a1, a0 = sum(pa[k] for k in j) / na, sum(la[k] for k in j) / na
        d_s.append(s1 - s0)
        d_a.append(a1 - a0)
        d_p.append(s1 * a1 - s0 * a0)
    q = sorted(d_p)
    p, L = out["pick"], out["last"]
    return {"n": ns, "last": L, "pick": p, "d_star": p["star"] - L["star"], "d_asked": p["asked"] - L["asked"],
            "d_prod": p["prod"] - L["prod"],
            "se_unpaired": [math.hypot(p["se_star"], L["se_star"]), math.hypot(p["se_asked"], L["se_asked"]),
                            math.hypot(p["se_prod"], L["se_prod"])],
            "se_paired": [sd(d_s), sd(d_a), sd(d_p)], "ci95_prod_paired": [q[int(.025 * B)], q[int(.975 * B)]]}


def by_epoch(lines: list[dict]) -> dict:
    """A reading's files by epoch: None for the last epoch's file (`NAME.safetensors`), EE for `NAME-0000EE`."""
    out = {}
    for d in lines:
        m = re.search(r"-(\d{6})\.safetensors$", d["file"])
        out[int(m.group(1)) if m else None] = d
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train: dict = {}
    reads: dict = {}
    with open(argv[0]) as fh:
        lines = fh.readlines()
    for line in lines:
        i = line.index("} {") + 2
        job = json.loads(line[:i - 1])["job"]
        d = json.loads(line[i:])
        kind, name = job.split("-", 1)
        if kind == "train":
            train[name] = d
        else:
            reads.setdefault(name, {}).setdefault(kind, []).append(d)
    for name, r in reads.items():
        if name not in train:  # e.g. "base-MODEL": the model without a LoRA, read on the same prompts
            continue
        t = train[name]
        leak = t["leak"]
        epochs = scored_epochs(len(leak), int(t["overrides"].get("epochs", 30)))
        sets = {k: by_epoch(r[kind]) for k, kind in (("r1", "read"), ("r2", "read2")) if kind in r}
        if len(sets) == 2:
            sets["pooled"] = {e: {k: a[k] + sets["r2"][e][k] for k in ("star_each", "asked_each")}
                              for e, a in sets["r1"].items() if e in sets["r2"]}
        for reading, files in sets.items():
            for b, pick in files.items():
                if b is None:
                    continue
                x = stats(files[None], pick, t["seed"])
                x.update(run=name, reading=reading, verdict=t["verdict"], pick_epoch=b, last_epoch=epochs[-1],
                         leak_pick=leak[epochs.index(b)], leak_last=leak[-1])
                label = name if b == t["best_epoch"] else f"{name}, epoch {b}"
                if "--json" in argv:
                    print(json.dumps(x))
                    continue
                f = lambda v: f"{100 * v:.1f}"
                P, L = x["pick"], x["last"]
                if "--md" in argv:
                    lab = {"r1": "first (seeds 7/31)", "r2": "second (seeds 1007/1031)", "pooled": "both"}[reading]
                    print(f"| {label} | {lab} | {x['n']} | {f(P['star'])} / {f(P['asked'])} / **{f(P['prod'])}** "
                          f"| {f(L['star'])} / {f(L['asked'])} / **{f(L['prod'])}** "
                          f"| {100 * x['d_star']:+.1f} ± {f(x['se_paired'][0])} "
                          f"| {100 * x['d_asked']:+.1f} ± {f(x['se_paired'][1])} "
                          f"| **{100 * x['d_prod']:+.1f} ± {f(x['se_paired'][2])}** ({f(x['se_unpaired'][2])}) "
                          f"| {100 * x['ci95_prod_paired'][0]:+.1f} to {100 * x['ci95_prod_paired'][1]:+.1f} |")
                    continue
                print(f"{label} {reading} N={x['n']} ({t['verdict']}, leakage last {leak[-1]}, pick {b}: {x['leak_pick']})")
                for k in ("pick", "last"):
                    y = x[k]
                    print(f"  {k}: star {f(y['star'])}±{f(y['se_star'])} asked {f(y['asked'])}±{f(y['se_asked'])} "
                          f"product {f(y['prod'])}±{f(y['se_prod'])}")
                print(f"  pick-last: star {f(x['d_star'])} (paired {f(x['se_paired'][0])}) asked {f(x['d_asked'])} "
                      f"(paired {f(x['se_paired'][1])}) product {f(x['d_prod'])} (paired {f(x['se_paired'][2])}, "
                      f"unpaired {f(x['se_unpaired'][2])}; paired 95% {f(x['ci95_prod_paired'][0])}.."
                      f"{f(x['ci95_prod_paired'][1])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
