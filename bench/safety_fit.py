"""Crisis-classifier fits: CPU and wall time per step with one BLAS thread against more, side by
side in one run, and whether the weights come out the same.

    .venv/bin/python bench/safety_fit.py --cache /tmp/safety_cache.npz [--steps 30] [--rounds 2]
        [--threads 1 2] [--out REPORT.json]

Each round runs one child process per thread count, one after the other (alternating, so a drift
in the machine's speed hits both): the child sets OPENBLAS_NUM_THREADS before numpy loads,
builds the features of the whole training set (embeddings from --cache; without it every message
is embedded first, ~5 min on two cores), and fits `--steps` steps of train.fit on all of it. The
report has each run's CPU seconds (process time: every thread of the child) and wall seconds of
the fit alone, their means per step, and the largest difference between the thread counts'
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from soulray.safety import train
from soulray.safety.dataset import LANGS, load_examples
from soulray.safety.features import Embedder
cache, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
examples = [e for lang in LANGS for e in load_examples(lang)]
x = train.featurize([e.text for e in examples], Embedder(), Path(cache) if cache else None)
train.STEPS = steps
cpu, wall = time.process_time(), time.perf_counter()
params = train.fit(x, train.targets(examples), train.FEATURES)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
np.savez(out, *params)
print(json.dumps({"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "rows": len(x.embed)}))
"""


def run_child(threads: int, cache: str, steps: int, out: Path) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, cache, str(steps), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the fit with {threads} BLAS thread(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from _args import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=str, default="", help="embedding cache (train.py --cache)")
    ap.add_argument(
        "--steps", type=positive_int, default=30, help="fit steps per run (training: 300)"
    )
    ap.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds")
    ap.add_argument(
        "--threads", type=positive_int, nargs="+", default=[1, 2], help="BLAS thread counts"
    )
    ap.add_argument("--out", type=Path, help="write the report here as JSON")
    args = ap.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    import numpy as np

    runs: dict[int, list[dict]] = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {t: Path(tmp, f"w{t}.npz") for t in args.threads}
        for r in range(args.rounds):
            for t in args.threads:
                res = run_child(t, args.cache, args.steps, weights[t])
                runs[t].append(res)
                print(f"round {r + 1}, {t} BLAS thread(s): {res}", flush=True)
        base = np.load(weights[args.threads[0]])
        diff = {}
        for t in args.threads[1:]:
            other = np.load(weights[t])
            diff[t] = max(
                float(np.abs(base[k].astype(np.float64) - other[k]).max(initial=0.0))
                for k in base.files
            )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "per_step_ms_mean": {
            t: {
                "cpu": round(1000 * sum(r["cpu_s"] for r in rs) / len(rs) / args.steps, 1),
                "wall": round(1000 * sum(r["wall_s"] for r in rs) / len(rs) / args.steps, 1),
            }
            for t, rs in runs.items()
        },
        "runs": runs,
        "max_weight_difference_vs_first": diff,
    }
    print(json.dumps(report["per_step_ms_mean"]), "max weight difference:", diff)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
