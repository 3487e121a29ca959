"""Run the training loop under plain torchrun (no Ray): for GPU boxes without Ray, and to
measure Ray Train's overhead on the very same loop.

    torchrun --nproc-per-node 8 -m soulray.train.torchrun --config jobs/X.yaml [overrides]

Distributed setup comes from torchrun's environment; each rank streams its rows straight from
the prepared Parquet by the same rule as under Ray (soulray/train/feed.py); checkpoints go to
train.storage_path/train.run_name, which must be a local or shared (NFS) path every rank sees.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from soulray import storage
from soulray.config import Config, ConfigError, load_config
from soulray.train.checkpoint import STATE_FILE, checkpoint_name, run_dir
from soulray.train.data import load_run_tokenizer
from soulray.train.feed import amplification_warning, build_source, parquet_chunks, plan_reads
from soulray.train.launch import (
    PROCESS_GROUP_TIMEOUT_S,
    check_before_workers,
    check_rows_per_rank,
    mark_launcher,
    process_group_backend,
)
from soulray.train.loop import Runtime, train_loop

log = logging.getLogger("soulray.train")


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return sorted(p for p in run.glob("checkpoint_*") if (p / STATE_FILE).exists())


def build_runtime(cfg: Config, rank: int, world: int, device: torch.device) -> Runtime:
    t = cfg.train
    if storage.is_remote(t.storage_path):
        raise ValueError(
            "the torchrun launcher writes checkpoints to a local or NFS "
            "train.storage_path; use `soulray train` (Ray) for s3:// or gs://"
        )
    run_path = Path(storage.normalize(run_dir(t)))
    run_path.mkdir(parents=True, exist_ok=True)
    data_dir = cfg.train_data_dir
    train_plans = plan_reads(data_dir, "train", world)
    # the Ray launcher's refusal of a rank without rows, and its micro-batch warning
    check_rows_per_rank(data_dir, train_plans, t.micro_batch_size, quiet=rank != 0)
    train = train_plans[rank]
    val = plan_reads(data_dir, "val", world)
    warning = amplification_warning(data_dir, world)
    if warning and rank == 0:
        log.warning("warning: %s", warning)

    def checkpoint_dir(step: int) -> str:
        path = run_path / checkpoint_name(step)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def report(metrics: dict[str, Any], ckpt: str | None) -> None:
        if ckpt and rank == 0:
            for old in checkpoints(run_path)[: -t.keep_checkpoints]:
                shutil.rmtree(old)

    def restore() -> str | None:
        found = checkpoints(run_path)
        return str(found[-1]) if found else None

    return Runtime(
        rank=rank,
        world_size=world,
        device=device,
        train_batches=build_source(
            lambda: parquet_chunks(train), t.micro_batch_size, t.shuffle_window_rows, t.seed, rank
        ),
        val_batches=(
            build_source(lambda: parquet_chunks(val[rank]), t.micro_batch_size, 0, 0, 0)
            if any(p.files for p in val)
            else None
        ),
        tokenizer=load_run_tokenizer(data_dir, cfg.model.trust_remote_code),
        metrics_path=str(run_path / "metrics.jsonl"),
        restore=restore,
        checkpoint_dir=checkpoint_dir,
        report=report,
    )


def check_gpu(cfg: Config) -> None:
    """train.use_gpu where torch sees no CUDA GPU (a missing driver, a CPU build of torch)
    would train on the CPU instead, a 7B model at a crawl or out of host memory."""
    if cfg.train.use_gpu and not torch.cuda.is_available():
        raise ValueError(
            "train.use_gpu=true but torch sees no CUDA GPU here (torch.cuda.is_available() is "
            "False: check the driver, CUDA_VISIBLE_DEVICES and that torch is a CUDA build); "
            "set train.use_gpu=false to train on the CPU"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see jobs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    cfg = load_config(args.config, args.overrides)
    check_gpu(cfg)
    # the Ray launcher's checks, so a torchrun resume refuses and warns alike
    cfg = check_before_workers(cfg, cfg.train_data_dir, torchrun=True)
    if os.environ.get("RANK", "0") == "0":
        mark_launcher(cfg, torchrun=True)
    cuda = cfg.train.use_gpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = process_group_backend(cfg.train) if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    try:
        train_loop(cfg, build_runtime(cfg, dist.get_rank(), dist.get_world_size(), device))
    finally:
        dist.destroy_process_group()


def run(argv: list[str] | None = None) -> None:
    """main(), with a user error (a config to fix, a refused resume) printed as one line by
    each rank and exit 2 for a config key, 1 otherwise, as the `soulray` CLI does."""
    from soulray.cli import user_error

    try:
        main(argv)
    except Exception as exc:
        found = user_error(exc)
        if found is None or os.environ.get("SOULRAY_DEBUG"):
            raise
        print(f"error: {found}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(found, ConfigError) else 1)


if __name__ == "__main__":
    run()
