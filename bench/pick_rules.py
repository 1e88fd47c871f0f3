"""Which epoch each candidate best-epoch rule picks, recomputed offline from logged runs (no training): every
`bench/reg_leak_demo.py` line in the logs (per-epoch leakage and improvement, "other concepts" measure) becomes an
`EpochCheck`/`LearnReport` and the report's own `judge()` (train/report.py) picks, with the "every epoch leaks"
branch (`pick_when_every_epoch_leaks`) swapped for each candidate. The classifier readings in the logs
(bench/read_demo_lora.py --each's lines, `--read` shares, bench/read_demo_lora.py's lines) are matched to the epochs they
read, so the table says which picks have been read.

The logs carry no per-pair validation losses, so the "clean" branch (`_as_good`, the one-standard-error rule)
recomputes to the lowest-loss clean epoch; where a run has a clean epoch the candidates (which differ only in the
every-epoch-leaks branch) all keep the logged pick, which is what the engine picked with its per-pair losses.
The validation loss is rebuilt as 1 − improvement (the base loss cancels out of every comparison).

    python bench/pick_rules.py LOG ... [--md]

Results: bench/results/demo_lora_cpu/best_epoch_pick_rule_2026-12-06.md.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.train import report as R

# the candidates for the every-epoch-leaks branch: pool (the learned epochs, or all) -> the pick
_pick = R.pick_when_every_epoch_leaks  # the shipped function (patched per candidate below)
A = "a: least leak, lowest loss"  # the rule before 2026-12-06 (the logs' engine)
RULES = {
    A: lambda pool: _pick(pool, 0.0),
    "b: the last epoch": lambda pool: pool[-1],
    "c0.5: >=0.5 of best impr.": lambda pool: _pick(pool, 0.5),
    "c0.8: >=0.8 of best impr.": lambda pool: _pick(pool, 0.8),
    "c0.9: >=0.9 of best impr.": lambda pool: _pick(pool, 0.9),
}


def objects(line: str) -> list[dict]:
    """The JSON objects on a log line (`{"job": ...} {...}`, `NAME {...}` or a bare `{...}`)."""
    dec, out, i = json.JSONDecoder(), [], line.find("{")
    while i >= 0:
        try:
            obj, end = dec.raw_decode(line, i)
        except json.JSONDecodeError:
            break
        out.append(obj)
        i = line.find("{", end)
    return out


def scored_epochs(n: int, epochs: int) -> list[int]:
    """The epoch numbers of a run's `n` scored epochs (every k-th and the last, as the engine scores)."""
    for k in range(1, epochs + 1):
        got = list(range(k, epochs + 1, k))
        got += [epochs] if got[-1:] != [epochs] else []
        if len(got) == n:
            return got
    raise ValueError(f"{n} scored epochs of {epochs}")


def load(paths: list[str]) -> tuple[list[dict], dict]:
    """The runs (one per training line) and the classifier readings: {LoRA file: [reading]}."""
    runs, reads = [], {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            objs = objects(line)
            job = objs[0].get("job", "") if len(objs) == 2 else ""
            d = objs[-1] if objs else {}
            if "improvement" in d and "leak" in d:
                name = job.replace("train-", "") or Path(d["out"]).name
                runs.append({**d, "name": name, "log": Path(path).name})
                if "star" in d:  # reg_leak_demo.py --read N: the final LoRA
                    reads.setdefault(d["lora"], []).append({"n": 64, "star": d["star"], "asked": d["other_asked"]})
            elif "file" in d and "star" in d:
                reads.setdefault(d["file"], []).append({"n": d.get("n", 64), "star": d["star"], "asked": d["other_asked"],
                                                        "seeds": d.get("seeds")})
    return runs, reads


def report_of(run: dict) -> R.LearnReport:
    epochs = scored_epochs(len(run["leak"]), int(run["overrides"].get("epochs", 30)))
    r = R.LearnReport(method="held-out", images=16, pairs=16, trigger="demostar", base_loss=1.0,
                      leak_measure=run["measure"], other_source=run.get("other_source", ""),
                      thresholds=R.thresholds_for(run["measure"]))
    r.epochs = [R.EpochCheck(epoch=e, step=0, val_loss=1 - imp, improvement=imp, leak=leak)
                for e, imp, leak in zip(epochs, run["improvement"], run["leak"])]
    return r


def picks(run: dict) -> dict:
    """The run's picks: the engine's logged one, the shipped rule's (today's judge()) and each candidate's."""
    r = report_of(run)
    r.judge()
    out = {"logged": run["best_epoch"], "shipped": r.best_epoch, "verdict": r.verdict,
           "clean": any(e.leak is None or e.leak <= r.leak_limit for e in r.epochs), "report": r}
    for name, rule in RULES.items():
        with mock.patch.object(R, "pick_when_every_epoch_leaks", rule):
            r.judge()
        out[name] = run["best_epoch"] if out["clean"] else r.best_epoch
    return out


def product(readings: list[dict]) -> str:
    """A file's classifier readings pooled: star share × asked share, with the generations per share."""
    n = sum(r["n"] for r in readings)
    star, asked = (sum(r[k] * r["n"] for r in readings) / n for k in ("star", "asked"))
    return f"{100 * star * asked:.1f}%/{n}"


def epoch_cell(rep: R.LearnReport, same: list[dict], reads: dict, ep: int) -> str:
    """An epoch in the table: its improvement and leakage, and its file's classifier readings (pooled) if any."""
    e = next(x for x in rep.epochs if x.epoch == ep)
    files = [x["lora"] if ep == rep.epochs[-1].epoch else x["lora"].replace(".safetensors", f"-{ep:06d}.safetensors")
             for x in same]
    got = list({json.dumps(r): r for f in files for r in reads.get(f, [])}.values())  # a retrained run's repeats once
    return f"{ep} ({e.improvement:.1%}, {e.leak:.3f})" + (f" **read {product(got)}**" if got else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs, reads = load([a for a in argv if not a.startswith("--")])
    groups: dict = {}  # the same run retrained (deterministic) in several logs, under one name or another
    for run in runs:
        if run["measure"] != R.OTHER_CONCEPTS:
            continue  # the pure-noise measure is no longer judged for leakage (no run "leaks" by it)
        model = "shapes-mini" if "mini" in run["name"] else "demo"
        groups.setdefault((model, tuple(run["leak"]), tuple(run["improvement"])), []).append(run)
    rows = []
    for (model, _, _), same in groups.items():
        run = same[0]
        p = picks(run)
        rep = p["report"]
        last = rep.epochs[-1].epoch
        cell = functools.partial(epoch_cell, rep, same, reads)
        top = max(e.improvement for e in rep.epochs)
        every = "" if len(rep.epochs) == last else f" ({len(rep.epochs)} of {last} epochs scored)"
        row = {"run": " = ".join(dict.fromkeys(x["name"] for x in same)) + every, "logs": [x["log"] for x in same],
               "model": model, "verdict": p["verdict"],
               "branch": "some clean" if p["clean"] else "every epoch leaks",
               "last": cell(last), "top": f"{top:.1%}",
               "a = logged": "yes" if p[A] == p["logged"] else f"NO (logged {p['logged']})",
               **{k: cell(p[k]) for k in RULES},
               "shipped now": cell(p["logged"] if p["clean"] else p["shipped"])}  # the clean branch is unchanged
        rows.append(row)
        if "--md" not in argv:
            print(json.dumps(row))
    if "--md" in argv:
        cols = ["run", "model", "branch", "last", "top"] + list(RULES) + ["shipped now", "a = logged"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for row in sorted(rows, key=lambda r: (r["branch"] != "every epoch leaks", r["model"] != "shapes-mini")):
            print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
