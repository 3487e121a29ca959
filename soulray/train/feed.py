"""Which packed rows each rank reads, and in which order, under both launchers.

Prepare writes a split as `part=<k>/` folders, k = row_key % P (P in the manifest). Rank r of
W reads exactly the partitions k with k % W == r when W divides P: its files hold its rows and
nothing else, so the cluster reads the split once per epoch whatever W is. Otherwise (a W that
does not divide P, or a directory prepared before partitions existed) every rank reads every
file and keeps row_key % W == r, as before, with a warning naming the read amplification.

The order is the same under Ray Data and torchrun: files by (partition, name), rows in file
order; then each epoch permutes consecutive windows of `shuffle_window_rows` rows with a seed
made of (train.seed, rank, epoch, window), so epochs differ, reruns agree, and a resumed run
replays exactly the stream it left. Windows are cut from the row stream, not from read chunks,
so the chunking of either reader does not change the order. Memory: one window plus a chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from soulray import storage
from soulray.data.manifest import read_manifest
from soulray.data.partition import partition_of

log = logging.getLogger("soulray.train")

COLUMNS = ["input_ids", "labels", "position_ids", "num_tokens"]
READ_ROWS = 256  # rows per read chunk (torchrun) / per Ray batch
BatchSource = Callable[[int], Iterator[pa.Table]]  # epoch -> that epoch's micro-batches


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads of a split: these files, filtered to its rows or not."""

    rank: int
    world: int
    files: list[str]
    filtered: bool  # the files also hold other ranks' rows: keep row_key % world == rank
    bytes: int  # size of the files: what this rank reads per epoch

    @property
    def columns(self) -> list[str]:
        return [*COLUMNS, "row_key"] if self.filtered else list(COLUMNS)


def manifest_partitions(data_dir: str) -> int | None:
    """P from the manifest; None for a directory prepared before partitions existed."""
    manifest = read_manifest(data_dir)
    return None if manifest is None else manifest.get("partitions")


def split_files(data_dir: str, split: str) -> list[tuple[str, int]]:
    """(path, size) of a split's Parquet files, in read order: by partition, then name."""
    directory = storage.join(data_dir, split)
    if not storage.exists(directory):
        return []
    fs, inner = storage.resolve(directory)
    from pyarrow.fs import FileSelector, FileType

    found = []
    for info in fs.get_file_info(FileSelector(inner, recursive=True)):
        rel = info.path[len(inner) :].lstrip("/")
        hidden = any(p.startswith((".", "_")) for p in rel.split("/"))
        if info.type == FileType.File and not hidden and rel.endswith(".parquet"):
            found.append((storage.join(directory, rel), info.size))
    return sorted(found, key=lambda f: (partition_of(f[0]) or 0, f[0]))


def plan_reads(data_dir: str, split: str, world: int) -> list[RankPlan]:
    """Every rank's reads of a split (the same rule on the driver and on each torchrun rank)."""
    files = split_files(data_dir, split)
    partitions = manifest_partitions(data_dir)
    pruned = bool(files) and partitions is not None and partitions % world == 0
    if pruned and any(partition_of(path) is None for path, _ in files):
        pruned = False  # a hand-made directory: the manifest says P but the files say otherwise
    plans = []
    for rank in range(world):
        mine = [
            (p, s) for p, s in files if not pruned or cast(int, partition_of(p)) % world == rank
        ]
        plans.append(
            RankPlan(
                rank, world, [p for p, _ in mine], not pruned and world > 1, sum(s for _, s in mine)
            )
        )
    return plans


def amplification_warning(data_dir: str, world: int) -> str | None:
    """Why every rank reads the whole split, if it does (None when each reads only its own)."""
    if world == 1:
        return None
    partitions = manifest_partitions(data_dir)
    if partitions is not None and partitions % world == 0:
        return None
    why = (
        f"train.num_workers={world} does not divide the {partitions} partitions of {data_dir}"
        if partitions is not None
        else f"{data_dir} was prepared without partitions (by an older soulray)"
    )
    fix = (
        f"use a number of workers that divides {partitions}"
        if partitions is not None
        else "re-run `soulray prepare` to write the partitioned layout"
    )
    return (
        f"{why}: every rank reads the whole split and keeps 1/{world} of it, {world}x the reads "
        f"of a partitioned feed (the cluster reads the split {world} times per epoch); {fix}"
    )


def rows_per_rank(plans: list[RankPlan]) -> list[int]:
    """Each rank's row count: from Parquet footers when pruned; else from one read of the
    row_key column (shared by every rank's count, not one read per rank)."""
    import pyarrow.parquet as pq

    world = len(plans)
    if not plans[0].filtered:
        return [sum(_footer_rows(path) for path in plan.files) for plan in plans]
    counts = np.zeros(world, dtype=np.int64)
    for path in plans[0].files:
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as f:
            keys = pq.read_table(f, columns=["row_key"])["row_key"].to_numpy()
        counts += np.bincount(keys % world, minlength=world)
    return counts.tolist()


def _footer_rows(path: str) -> int:
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        return pq.ParquetFile(f).metadata.num_rows


def parquet_chunks(plan: RankPlan, batch_rows: int = READ_ROWS) -> Iterator[pa.Table]:
    """torchrun path: this rank's rows, streamed from Parquet a chunk at a time."""
    import pyarrow.parquet as pq

    for path in plan.files:
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as f:
            for batch in pq.ParquetFile(f).iter_batches(
                batch_size=batch_rows, columns=plan.columns
            ):
                yield select_rank_rows(pa.Table.from_batches([batch]), plan)


def select_rank_rows(table: pa.Table, plan: RankPlan) -> pa.Table:
    if not plan.filtered:
        return table.select(COLUMNS)
    mine = table["row_key"].to_numpy() % plan.world == plan.rank
    return table.filter(pa.array(mine)).select(COLUMNS)


def ray_chunks(shard: Any, batch_rows: int = READ_ROWS) -> Iterator[pa.Table]:
    """Ray path: this rank's rows from its Ray Train dataset shard (already pruned/filtered)."""
    for batch in shard.iter_batches(
        batch_size=batch_rows, batch_format="pyarrow", prefetch_batches=2
    ):
        yield batch.select(COLUMNS)


def shuffle_windows(chunks: Iterable[pa.Table], window: int, seed: list[int]) -> Iterator[pa.Table]:
    """Permute consecutive windows of `window` rows (0 = keep the order); seeded per window."""
    pending: list[pa.Table] = []
    rows = index = 0
    for chunk in chunks:
        if not window:
            yield chunk
            continue
        pending.append(chunk)
        rows += chunk.num_rows
        while rows >= window:
            table = pa.concat_tables(pending)
            yield permute(table.slice(0, window), [*seed, index])
            index += 1
            pending, rows = [table.slice(window)], rows - window
    if rows:
        yield permute(pa.concat_tables(pending), [*seed, index])


def permute(table: pa.Table, seed: list[int]) -> pa.Table:
    order = np.random.default_rng(seed).permutation(table.num_rows)
    return table.take(pa.array(order))


def rebatch(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Micro-batches of exactly `size` rows (the last one of an epoch may be shorter)."""
    pending: list[pa.Table] = []
    rows = 0
    for table in tables:
        pending.append(table)
        rows += table.num_rows
        if rows < size:
            continue
        merged = pa.concat_tables(pending)
        start = 0
        while rows - start >= size:
            yield merged.slice(start, size)
            start += size
        pending, rows = [merged.slice(start)], rows - start
    if rows:
        yield pa.concat_tables(pending)


def build_source(
    read: Callable[[], Iterable[pa.Table]],
    micro_batch_size: int,
    window: int,
    seed: int,
    rank: int,
) -> BatchSource:
    """One epoch of micro-batches per call: the rows of `read()`, window-shuffled for it."""

    def one_epoch(epoch: int) -> Iterator[pa.Table]:
        chunks = shuffle_windows(read(), window, [seed % 2**63, rank, epoch])
        yield from rebatch(chunks, micro_batch_size)

    return one_epoch


@dataclass
class DataPosition:
    """Where the feed is: the epoch, and micro-batches consumed within it (checkpointed)."""

    epoch: int = 0
    batch: int = 0


def cycle(source: BatchSource, position: DataPosition) -> Iterator[pa.Table]:
    """Micro-batches forever, epoch after epoch, from `position` on (updated as they go)."""
    epoch, skip = position.epoch, position.batch
    while True:
        seen = 0
        for batch in source(epoch):
            seen += 1
            if seen > skip:
                position.epoch, position.batch = epoch, seen
                yield batch
        if seen == 0:
            raise ValueError(
                "this rank has no training rows: the prepared train split has fewer packed rows "
                "than train.num_workers; prepare more data or use fewer workers"
            )
        epoch, skip = epoch + 1, max(0, skip - seen)
