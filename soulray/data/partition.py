"""The partitioned write of packed rows: `<split>/part=<k>/rows-<n>.parquet`, k = row_key % P.

Training rank r of W reads only the partitions k with k % W == r (when W divides P), so no
rank opens a file holding another rank's rows. Two steps keep the files few and large
whatever the block size: each render actor stages one small file per (block, partition)
under `<split>/_blocks/` (hidden from readers by its leading underscore), then one pass per
partition streams its staged files, in name order, into `rows-<n>.parquet` with row groups
of about ROW_GROUP_BYTES and deletes the stage. Row order within a partition is therefore
deterministic (staged file name = the block's first content hash, rows sorted by row_key).

Why P = 192 (bench/RESULTS.md, "Train feed"): 192 = 2^6 * 3 is divisible by every world size
a cluster of 8-GPU nodes usually has (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192), and
after compaction a partition costs one file, not one per block (measured: +15 % bytes over
P = 48 on a 71 MB split; not measured on larger ones). 8 MiB row groups bound the decode unit;
their size is not settled by measurement yet (the bench split's partitions were one group each).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa

from soulray import storage

PARTITIONS = 192
STAGE_DIR = "_blocks"
ROW_GROUP_BYTES = 8 * 2**20
FILE_ROWS = 2**20  # rows per compacted file (a partition larger than this rolls over)
PART_RE = re.compile(r"/part=(\d+)/")


def part_dir(k: int) -> str:
    return f"part={k:03d}"


def partition_of(path: str) -> int | None:
    """The partition a file belongs to (from its `part=<k>/` folder), None outside one."""
    match = PART_RE.search(path.replace("\\", "/"))
    return int(match.group(1)) if match else None


def write_block_partitions(
    table: pa.Table, out: str, split: str, name: str, partitions: int = PARTITIONS
) -> int:
    """Stage one render block's rows: one file per non-empty partition. Returns files written."""
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        return 0
    parts = table.column("row_key").to_numpy() % partitions
    order = np.argsort(parts, kind="stable")  # keeps the row_key order inside a partition
    bounds = np.flatnonzero(np.diff(parts[order])) + 1
    written = 0
    for idx in np.split(order, bounds):
        k = int(parts[idx[0]])
        path = storage.join(out, split, STAGE_DIR, part_dir(k), f"{name}.parquet")
        fs, inner = storage.resolve(path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table.take(pa.array(idx)), inner, filesystem=fs, compression="zstd")
        written += 1
    return written


def row_group_rows(seq_len: int) -> int:
    """Rows per row group: about ROW_GROUP_BYTES of the three int32 token columns."""
    return max(1, ROW_GROUP_BYTES // (3 * 4 * seq_len))


def compact_partition(
    out: str, split: str, k: int, seq_len: int, group_rows: int | None = None
) -> int:
    """Stream partition k's staged files (name order) into rows-<n>.parquet, in row groups of
    `group_rows` (staged files hold a few rows each: they are buffered up to a full group, as
    a row group per staged file would be tiny and compress poorly). Returns files written."""
    staged = storage.join(out, split, STAGE_DIR, part_dir(k))
    if not storage.exists(staged):
        return 0
    group = group_rows or row_group_rows(seq_len)
    sink = _PartitionSink(out, split, k, group)
    for path in storage.list_files(staged, (".parquet",)):
        sink.add(_read(path))
    return sink.close()


def _read(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        return pq.read_table(f)


class _PartitionSink:
    """Buffers rows into full row groups and rolls to a new file every FILE_ROWS rows."""

    def __init__(self, out: str, split: str, k: int, group: int):
        self.out, self.split, self.k, self.group = out, split, k, group
        self.pending: list[pa.Table] = []
        self.rows = self.rows_in_file = self.files = 0
        self.writer: Any = None

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        while self.rows >= self.group:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, self.group))
            rest = merged.slice(self.group)
            self.pending, self.rows = [rest], rest.num_rows

    def close(self) -> int:
        if self.rows:
            self._write(pa.concat_tables(self.pending))
        if self.writer is not None:
            self.writer.close()
        return self.files

    def _write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self.writer is None or self.rows_in_file >= FILE_ROWS:
            if self.writer is not None:
                self.writer.close()
            name = f"rows-{self.files:05d}.parquet"
            fs, inner = storage.resolve(storage.join(self.out, self.split, part_dir(self.k), name))
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
            self.writer = pq.ParquetWriter(inner, table.schema, filesystem=fs, compression="zstd")
            self.files, self.rows_in_file = self.files + 1, 0
        self.writer.write_table(table.combine_chunks(), row_group_size=self.group)
        self.rows_in_file += table.num_rows


def compact_partitions(out: str, split: str, seq_len: int, partitions: int = PARTITIONS) -> int:
    """Compact every partition of a split (Ray tasks, a few partitions each); drop the stage.
    Returns the number of files the split now has."""
    import ray

    remote = ray.remote(num_cpus=1)(_compact_many)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = [list(range(i, partitions, cpus * 2)) for i in range(min(partitions, cpus * 2))]
    files = sum(ray.get([remote.remote(out, split, g, seq_len) for g in groups]))
    storage.delete_dir(storage.join(out, split, STAGE_DIR))
    return files


def _compact_many(out: str, split: str, ks: list[int], seq_len: int) -> int:
    return sum(compact_partition(out, split, k, seq_len) for k in ks)
