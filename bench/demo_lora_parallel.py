"""Run `demo_lora_sweep.py` settings x training seeds on many CPU cores at once, one process per core.

    python bench/demo_lora_parallel.py --work DIR --procs 14 --seeds 1-5 [--n 64] [--model CKPT] \\
        '{"e30": {"epochs": 30}, "e60": {"epochs": 60}, "r16": {"epochs": 30, "rank": 16, "alpha": 16.0}}'

Every setting runs once per seed (run name `<setting>_s<seed>`). The classifier and the base model's
reading are made once first, then the runs are dealt round-robin to `--procs` processes
(OMP_NUM_THREADS=1 each) sharing DIR. Each process's lines go to DIR/proc-K.log; at the end a table of
the "star" share per setting and seed, with the mean, is printed and written to DIR/summary.json.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

SWEEP = Path(__file__).with_name("demo_lora_sweep.py")


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", help="JSON object: setting name -> TrainConfig overrides (demo_lora_sweep.py)")
    p.add_argument("--work", required=True)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seeds", default="1-5")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--model", default="")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, str(SWEEP), "--work", str(work), "--n", str(args.n)]
    common += ["--model", args.model] if args.model else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*common, "{}"], env=env, check=True)  # the classifier and the base reading, once
    runs = [(f"{name}_s{seed}", {**overrides, "seed": seed})
            for name, overrides in json.loads(args.settings).items() for seed in seeds_of(args.seeds)]
    shares = [dict(runs[k::args.procs]) for k in range(min(args.procs, len(runs)))]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(work / f"proc-{k}.log", "w")) for k in range(len(shares))]
        procs = [subprocess.Popen([*common, json.dumps(share)], env=env, stdout=log, stderr=subprocess.STDOUT)
                 for share, log in zip(shares, logs)]
        failed = sum(proc.wait() != 0 for proc in procs)
    results: dict[str, dict[int, float]] = {}
    for log in sorted(work.glob("proc-*.log")):
        for line in log.read_text().splitlines():
            name, _, rest = line.partition(" ")
            if "_s" not in name or not rest.startswith("{"):
                continue
            reading = ast.literal_eval(rest[rest.rindex("{'argmax'"):])  # the line's last dict: the reading
            setting, _, seed = name.rpartition("_s")
            results.setdefault(setting, {})[int(seed)] = reading["argmax"]
    base = json.loads((work / f"base-{args.n}.json").read_text())["argmax"]
    summary = {"base": base, "n": args.n, "settings": json.loads(args.settings), "star": results,
               "mean": {s: round(sum(v.values()) / len(v), 3) for s, v in results.items()}, "failed_procs": failed}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"base {base:.1%}")
    for setting, by_seed in results.items():
        cells = " / ".join(f"{by_seed[s]:.0%}" for s in sorted(by_seed))
        print(f"{setting}: {cells}  mean {summary['mean'][setting]:.1%}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
