"""The training feed: each rank reads only its own partitions (Ray Data and torchrun), the
fallback for world sizes and old directories the layout cannot prune for, and the seeded
per-epoch shuffle and resumable position."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from soulray import storage
from soulray.config import Config, load_config
from soulray.data.partition import PARTITIONS, partition_of
from soulray.train.data import load_run_tokenizer, to_tensors
from soulray.train.feed import (
    DataPosition,
    amplification_warning,
    build_source,
    cycle,
    parquet_chunks,
    plan_reads,
    rebatch,
    rows_per_rank,
    shuffle_windows,
    split_files,
)
from soulray.train.launch import build_datasets
from soulray.train.model import build_model, build_model_config, load_initial_state

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def row_keys(files: list[str]) -> list[int]:
    return [k for f in files for k in pq.read_table(f, columns=["row_key"])["row_key"].to_pylist()]


def read_stats(ds) -> dict[str, int]:
    """From Ray Data's own stats of a (materialized) dataset: files listed, rows read."""
    found: dict[str, int] = {}

    def walk(summary) -> None:
        for op in summary.operators_stats:
            if op.output_num_rows is not None:
                found[op.operator_name] = op.output_num_rows.sum
        for parent in summary.parents:
            walk(parent)

    walk(ds._get_stats_summary())
    return {"files": found["ListFiles"], "rows": found["ReadFilesParquetV2"]}


def test_prepare_writes_one_partition_per_row_key_residue(prepared_quickstart) -> None:
    data = str(prepared_quickstart)
    manifest = json.loads((prepared_quickstart / "manifest.json").read_text())
    assert manifest["partitions"] == PARTITIONS == 192
    for split in ("train", "val"):
        files = [f for f, _ in split_files(data, split)]
        assert manifest["splits"][split]["files"] == len(files) > 0
        assert not (prepared_quickstart / split / "_blocks").exists()  # the stage is gone
        rows = 0
        for f in files:
            keys = np.array(row_keys([f]))
            assert (keys % PARTITIONS == partition_of(f)).all(), f
            rows += len(keys)
        assert rows == manifest["splits"][split]["rows"]


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_rows_once(ray_local, prepared_quickstart, world) -> None:
    """Ray Data's read of rank r opens only rank r's files: bytes read per rank sum to the
    split's size, and the union of the ranks' rows is the split, each row exactly once."""
    data = str(prepared_quickstart)
    split = split_files(data, "train")
    datasets = build_datasets(data, world)
    plans = plan_reads(data, "train", world)
    assert amplification_warning(data, world) is None
    seen: list[int] = []
    counts = rows_per_rank(plans)
    for plan in plans:
        assert not plan.filtered
        ds = datasets[f"train_{plan.rank}"]
        keys = row_keys(plan.files)
        assert keys and all(k % world == plan.rank for k in keys)
        assert read_stats(ds) == {"files": len(plan.files), "rows": len(keys)}
        assert ds.count() == counts[plan.rank] == len(keys)
        seen += keys
    assert sorted(seen) == sorted(row_keys([f for f, _ in split]))
    assert len(set(seen)) == len(seen)
    assert sum(p.bytes for p in plans) == sum(size for _, size in split)


def test_a_world_size_not_dividing_p_reads_everything_with_a_warning(
    ray_local, prepared_quickstart
) -> None:
    data = str(prepared_quickstart)
    split_bytes = sum(size for _, size in split_files(data, "train"))
    warning = amplification_warning(data, 5)
    assert warning is not None and "does not divide the 192 partitions" in warning
    assert "5x the reads" in warning
    datasets = build_datasets(data, 5)
    total = 0
    plans = plan_reads(data, "train", 5)
    counts = rows_per_rank(plans)
    for plan in plans:
        assert plan.filtered and plan.bytes == split_bytes  # the read amplification
        keys = [k for k in row_keys(plan.files) if k % 5 == plan.rank]
        ds = datasets[f"train_{plan.rank}"]
        # every rank reads all of the split's files; Ray pushes the filter into the read
        assert plan.files == [f for f, _ in split_files(data, "train")]
        assert read_stats(ds)["rows"] == len(keys)
        assert ds.count() == counts[plan.rank] == len(keys)
        total += len(keys)
    assert total == len(row_keys(plan.files))


def test_shuffle_is_seeded_per_epoch_and_blind_to_read_chunking() -> None:
    table = pa.table({"x": list(range(100))})

    def epoch_rows(chunk: int, epoch: int, window: int = 32) -> list[int]:
        chunks = [table.slice(i, chunk) for i in range(0, 100, chunk)]
        source = build_source(lambda: iter(chunks), 3, window, seed=7, rank=1)
        return [x for b in source(epoch) for x in b["x"].to_pylist()]

    first = epoch_rows(10, 0)
    assert sorted(first) == list(range(100)) and first != list(range(100))
    assert epoch_rows(7, 0) == epoch_rows(64, 0) == first  # chunking does not change the order
    assert epoch_rows(10, 1) != first and sorted(epoch_rows(10, 1)) == list(range(100))
    assert sorted(first[:32]) == list(range(32))  # windows of 32 rows, permuted in place
    assert epoch_rows(10, 0, window=0) == list(range(100))
    assert [b.num_rows for b in rebatch(iter([table.slice(0, 5), table.slice(5, 6)]), 4)] == [
        4,
        4,
        3,
    ]
    assert sum(t.num_rows for t in shuffle_windows(iter([table]), 40, [0])) == 100


def test_cycle_resumes_exactly_where_it_stopped() -> None:
    table = pa.table({"x": list(range(10))})
    source = build_source(lambda: iter([table]), 3, 8, seed=0, rank=0)
    position = DataPosition()
    stream = cycle(source, position)
    whole = [next(stream)["x"].to_pylist() for _ in range(9)]  # 4 batches an epoch: 2.25 epochs
    position = DataPosition()
    stream = cycle(source, position)
    for _ in range(5):
        next(stream)
    assert (position.epoch, position.batch) == (1, 1)
    resumed = cycle(source, DataPosition(position.epoch, position.batch))
    assert [next(resumed)["x"].to_pylist() for _ in range(4)] == whole[5:]


def old_layout(prepared: Path, target: Path) -> Path:
    """The prepared directory as soulray wrote it before partitions: flat files, no P."""
    shutil.copytree(prepared, target)
    for split in ("train", "val"):
        for k, part in enumerate(sorted((target / split).glob("part=*"))):
            for f in part.glob("*.parquet"):
                f.rename(target / split / f"part-{k:05d}.parquet")
            part.rmdir()
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["partitions"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def run_torchrun(data: Path, out: Path, world: int, port: int, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--master-port", str(port), "-m", "soulray.train.torchrun"]
    cmd += ["--config", str(QUICKSTART), f"data.output_dir={data}", f"train.storage_path={out}"]
    cmd += ["train.run_name=run", f"train.export_dir={out}/model", "train.log_every=1"]
    cmd += ["train.eval_every=0", "train.checkpoint_every=0", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr + done.stdout


def first_step_loss(cfg: Config, world: int) -> float:
    """The first step's loss computed by hand: every rank's first micro-batch of its feed
    through the initial model, summed and divided by the global target count."""
    data = cfg.data.output_dir
    tokenizer = load_run_tokenizer(data)
    hf_config = build_model_config(cfg.model, tokenizer)
    model = build_model(cfg, hf_config, "sdpa", "cpu")
    model.load_state_dict(load_initial_state(cfg, hf_config, "sdpa"))
    t = cfg.train
    total, targets = 0.0, 0
    with torch.no_grad():
        for plan in plan_reads(data, "train", world):
            source = build_source(
                lambda p=plan: parquet_chunks(p),
                t.micro_batch_size,
                t.shuffle_window_rows,
                t.seed,
                plan.rank,
            )
            batch = to_tensors(next(source(0)), torch.device("cpu"))
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits  # no cache: packed rows get their per-sequence mask, as in training
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            targets += int((labels != -100).sum())
    return total / targets


def check_trained(data: Path, out: Path, world: int, log: str, steps: int) -> None:
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    cfg = load_config(QUICKSTART, [f"data.output_dir={data}"])
    assert metrics[0]["loss"] == pytest.approx(first_step_loss(cfg, world), rel=1e-5)
    # the lr logged with a step is the one it trained with (warmup's first: lr / warmup_steps)
    from soulray.train.loop import lr_factor

    assert [m["lr"] for m in metrics] == [
        pytest.approx(cfg.train.lr * lr_factor(s, cfg.train)) for s in range(steps)
    ]
    assert (out / "model" / "model.safetensors").exists()


def test_torchrun_with_a_world_size_not_dividing_p_trains_with_the_warning(
    prepared_quickstart, tmp_path
) -> None:
    log = run_torchrun(prepared_quickstart, tmp_path, 5, 29541, "train.steps=2")
    assert "train.num_workers=5 does not divide the 192 partitions" in log
    check_trained(prepared_quickstart, tmp_path, 5, log, 2)


def test_an_old_directory_without_partitions_trains_with_the_warning(
    prepared_quickstart, tmp_path
) -> None:
    old = old_layout(prepared_quickstart, tmp_path / "old")
    assert storage.exists(str(old / "train" / "part-00000.parquet"))
    plans = plan_reads(str(old), "train", 2)
    assert all(p.filtered and len(p.files) == len(plans[0].files) for p in plans)
    log = run_torchrun(old, tmp_path / "runs", 2, 29543, "train.steps=3")
    assert "was prepared without partitions" in log and "2x the reads" in log
    check_trained(old, tmp_path / "runs", 2, log, 3)


def test_a_micro_batch_larger_than_a_ranks_rows_is_warned(
    prepared_quickstart, caplog, tmp_path
) -> None:
    from soulray.train.launch import check_rows_per_rank

    data = str(prepared_quickstart)
    plans = plan_reads(data, "train", 2)
    fewest = min(rows_per_rank(plans))
    with caplog.at_level("WARNING", logger="soulray.train"):
        check_rows_per_rank(data, plans, fewest)  # fits: no warning
        assert caplog.messages == []
        check_rows_per_rank(data, plans, fewest + 1)
    assert caplog.messages == [
        f"warning: train.micro_batch_size={fewest + 1} is more than the {fewest} rows a rank "
        "has: a micro-batch is then a whole epoch of those rows, smaller than asked"
    ]
    # torchrun's ranks: rank 0 warns alike (it did not), the other rank says nothing
    from soulray.train.torchrun import build_runtime

    cfg = load_config(
        QUICKSTART,
        [
            f"data.output_dir={data}",
            f"train.storage_path={tmp_path}",
            f"train.micro_batch_size={fewest + 1}",
        ],
    )
    for rank in (0, 1):
        caplog.clear()
        with caplog.at_level("WARNING", logger="soulray.train"):
            build_runtime(cfg, rank, 2, torch.device("cpu"))
        assert len(caplog.messages) == (1 if rank == 0 else 0), rank
