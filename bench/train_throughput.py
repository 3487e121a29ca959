"""Training throughput on CPU, side by side in one run, on the same tiny model and data:

1. soulray's loop vs the transformers Trainer (1 process each, same model, same packed rows,
   same micro-batch, same threads): target soulray >= 1.0x;
2. packed vs padded rows (soulray, 1 process): real (non-pad) tokens per second;
3. Ray Train vs torchrun running the same loop with 2 workers: target Ray overhead <= 3 %.

Every figure is steady state, measured the same way for each: the median, over the windows of
`--log-every` steps after `--warmup` steps, of the mean step time (data loading, logging and Ray's
report included; process and Ray start-up excluded). The Trainer's is the time between
consecutive step ends. Every run is repeated `--rounds` times, all runs in turn each round, and
the median over rounds is reported (the per-round figures too).
tokens/s = mean real tokens per row x rows per step / median step time.

    .venv/bin/python bench/train_throughput.py --rounds 3 --out bench/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SOULRAY = str(Path(PY).parent / "soulray")
CORPUS = [
    "jobs/data/sample_zh.jsonl",
    "jobs/data/sample_en.jsonl",
    "../shared/data/emollm/data.json",
]


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(
        cmd,
        cwd=ROOT,
        check=True,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=3600,
    )


def prepare(out: Path, mode: str, seq_len: int) -> Path:
    data = out / f"data-{mode}"
    run(
        [
            SOULRAY,
            "prepare",
            "--config",
            "jobs/quickstart.yaml",
            f"data.inputs={json.dumps(CORPUS)}",
            f"data.output_dir={data}",
            f"data.mode={mode}",
            f"data.seq_len={seq_len}",
            "data.tokenizer_vocab_size=4096",
        ]
    )
    return data


def train_overrides(data: Path, out: Path, name: str, a: argparse.Namespace) -> list[str]:
    return [
        f"data.output_dir={data}",
        f"train.storage_path={out}",
        f"train.run_name={name}",
        f"train.export_dir={out}/{name}-model",
        f"train.steps={a.steps}",
        f"train.micro_batch_size={a.batch}",
        f"train.log_every={a.log_every}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.warmup_steps=2",
        "train.lr=1e-3",
    ]


def median_step_time(out: Path, name: str, warmup: int) -> float:
    """Median over the logged windows after warm-up of the mean step time in each window
    (a window is log_every steps, its report and metrics write included)."""
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["step_time_s"] for m in lines if m["step"] > warmup)


def soulray_torchrun(
    data: Path, out: Path, name: str, nproc: int, a: argparse.Namespace, threads: int = 0
) -> float:
    omp = {"OMP_NUM_THREADS": str(threads or a.threads // nproc)}
    run(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            "29555",
            "-m",
            "soulray.train.torchrun",
            "--config",
            "jobs/quickstart.yaml",
            *train_overrides(data, out, name, a),
        ],
        omp,
    )
    return median_step_time(out, name, a.warmup)


def soulray_ray(data: Path, out: Path, name: str, workers: int, a: argparse.Namespace) -> float:
    """Ray Train sizes each CPU worker to leave one CPU to Ray Data, so 1 worker gets 1 CPU
    (and 1 thread) and 2 workers get half a CPU each (1 thread each) on this 2-CPU machine."""
    run(
        [
            SOULRAY,
            "train",
            "--config",
            "jobs/quickstart.yaml",
            f"train.num_workers={workers}",
            *train_overrides(data, out, name, a),
        ]
    )
    return median_step_time(out, name, a.warmup)


def hf_trainer(data: Path, a: argparse.Namespace) -> float:
    """The transformers Trainer on the same model config, rows and batch (in a subprocess)."""
    script = ROOT / "bench" / "hf_trainer_baseline.py"
    result = subprocess.run(
        [PY, str(script), str(data), str(a.steps), str(a.batch), str(a.warmup)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "OMP_NUM_THREADS": str(a.threads)},
    )
    return float(result.stdout.strip().splitlines()[-1])


def mean_row_tokens(data: Path) -> float:
    import pyarrow.parquet as pq

    table = pq.read_table(data / "train", columns=["num_tokens"])
    return sum(table["num_tokens"].to_pylist()) / table.num_rows


def main() -> None:
    from _args import non_negative_int, positive_int

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=60,
        help="optimizer steps per run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=10,
        help="first steps left out of the medians (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="alternating repeats of every run"
    )
    parser.add_argument(
        "--log-every",
        type=positive_int,
        default=5,
        help="train.log_every: steps per measured window (default: %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=4,
        help="train.micro_batch_size: packed rows per step (default: %(default)s)",
    )
    parser.add_argument(
        "--seq-len", type=positive_int, default=1024, help="tokens per row (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=2,
        help="CPU threads per run, split among its processes (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="bench/results/train_cpu.json",
        help="the report JSON (default: %(default)s)",
    )
    a = parser.parse_args()
    if a.warmup >= a.steps - 1:  # the Trainer's step times: the steps - 1 gaps between step ends
        parser.error(
            f"--warmup {a.warmup} leaves no step time of --steps {a.steps} (at most steps - 2)"
        )
    if not (ROOT / CORPUS[-1]).is_file():
        raise SystemExit(f"bench/train_throughput.py needs {CORPUS[-1]} (the shared corpora)")
    out = Path(tempfile.mkdtemp(prefix="soulray-bench-train-"))
    packed, padded = prepare(out, "packed", a.seq_len), prepare(out, "padded", a.seq_len)
    tokens = {"packed": mean_row_tokens(packed), "padded": mean_row_tokens(padded)}

    # name, data, workers, measure(round) -> median step time; the pairs that are compared run
    # alternately, round after round, so that drift on a shared machine hits both sides alike
    def torchrun(data: Path, tag: str, nproc: int, threads: int = 0):
        return lambda r: soulray_torchrun(data, out, f"{tag}-{r}", nproc, a, threads)

    def ray_train(tag: str, workers: int):
        return lambda r: soulray_ray(packed, out, f"{tag}-{r}", workers, a)

    configs = [
        ("soulray_1proc_packed", "packed", 1, torchrun(packed, "s1", 1)),
        ("hf_trainer_1proc_packed", "packed", 1, lambda r: hf_trainer(packed, a)),
        ("soulray_1proc_padded", "padded", 1, torchrun(padded, "s1pad", 1)),
        ("torchrun_2proc_packed", "packed", 2, torchrun(packed, "t2", 2)),
        ("ray_train_2workers_packed", "packed", 2, ray_train("r2", 2)),
        # one worker, one thread: a core is left to Ray's own services, as on a GPU node
        ("torchrun_1proc_1thread", "packed", 1, torchrun(packed, "t1", 1, threads=1)),
        ("ray_train_1worker_1thread", "packed", 1, ray_train("r1", 1)),
    ]
    rounds: dict[str, list[float]] = {name: [] for name, *_ in configs}
    for r in range(a.rounds):
        for name, _, _, measure in configs:
            rounds[name].append(measure(r))
    runs = [
        (name, kind, workers, statistics.median(rounds[name])) for name, kind, workers, _ in configs
    ]
    step = {name: seconds for name, _, _, seconds in runs}
    tps = {
        name: tokens[kind] * a.batch * workers / seconds for name, kind, workers, seconds in runs
    }
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(a),
        "mean_real_tokens_per_row": tokens,
        "median_step_time_s": step,
        "step_time_s_per_round": rounds,
        "tokens_per_s": tps,
        "soulray_vs_hf_trainer": tps["soulray_1proc_packed"] / tps["hf_trainer_1proc_packed"],
        "packed_vs_padded": tps["soulray_1proc_packed"] / tps["soulray_1proc_padded"],
        "ray_overhead_2workers_on_2_cpus": (
            step["ray_train_2workers_packed"] / step["torchrun_2proc_packed"] - 1
        ),
        "ray_overhead_1worker_spare_cpu": (
            step["ray_train_1worker_1thread"] / step["torchrun_1proc_1thread"] - 1
        ),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
