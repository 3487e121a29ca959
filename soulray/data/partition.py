"""The partitioned write of packed rows: `<split>/part=<k>/rows-<n>.parquet`, k = row_key % P.

Training rank r of W reads only the partitions k with k % W == r (when W divides P), so no
rank opens a file holding another rank's rows. Two steps keep the files few and large
whatever the block size: each render actor stages one file per block, one row group per
partition, under `<split>/_blocks/` (hidden from readers by its leading underscore), then
compaction tasks, a few partitions each, stream the staged files in name order into
`rows-<n>.parquet` per partition with row groups of about ROW_GROUP_BYTES and delete the
stage. Row order within a partition is therefore deterministic (staged file name = the
block's first content hash, rows sorted by row_key).

Why P = 192 (bench/RESULTS.md, "Train feed"): 192 = 2^6 * 3 is divisible by every world size
a cluster of 8-GPU nodes usually has (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192), and
after compaction a partition costs one file, not one per block (measured: +15 % bytes over
P = 48 on a 71 MB split; not measured on larger ones). 8 MiB row groups bound the decode unit;
their size is not settled by measurement yet (the bench split's partitions were one group each).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa

from soulray import storage

PARTITIONS = 192
STAGE_DIR = "_blocks"
STAGE_KEY = "soulray.partitions"  # staged file metadata: the partition of each row group
# partitions per compaction task: each task opens every staged block file once, and holds up to
# one row group (ROW_GROUP_BYTES) per partition it compacts: 16 -> at most ~130 MiB a task
COMPACT_TASK_PARTITIONS = 16
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
    """Stage one render block's rows as ONE file, one row group per non-empty partition (their
    partitions listed in the file's metadata). Returns the partitions staged."""
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        return 0
    parts = table.column("row_key").to_numpy() % partitions
    order = np.argsort(parts, kind="stable")  # keeps the row_key order inside a partition
    starts = np.concatenate([[0], np.flatnonzero(np.diff(parts[order])) + 1, [len(order)]])
    present = parts[order][starts[:-1]].tolist()
    table = table.take(pa.array(order))
    table = table.replace_schema_metadata({STAGE_KEY: json.dumps(present)})
    fs, inner = storage.resolve(storage.join(out, split, STAGE_DIR, f"{name}.parquet"))
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    # no dictionary encoding (token ids barely repeat within a few rows): half the write and
    # read time of the default, and smaller; the compacted files are written with the default
    options = {"compression": "zstd", "use_dictionary": False}
    with pq.ParquetWriter(inner, table.schema, filesystem=fs, **options) as writer:
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return len(present)


def row_group_rows(seq_len: int) -> int:
    """Rows per row group: about ROW_GROUP_BYTES of the three int32 token columns."""
    return max(1, ROW_GROUP_BYTES // (3 * 4 * seq_len))


def compact_partition(
    out: str, split: str, k: int, seq_len: int, group_rows: int | None = None
) -> int:
    """Stream partition k's rows from the staged block files into rows-<n>.parquet. Returns
    files written."""
    return compact_many(out, split, [k], seq_len, group_rows)


def compact_many(
    out: str, split: str, ks: list[int], seq_len: int, group_rows: int | None = None
) -> int:
    """Compact partitions `ks`: every staged block file (name order) is opened once and its row
    groups of these partitions appended to their partition's sink, which writes full row groups
    of `group_rows` (a block holds a few rows per partition: a row group per block would be tiny
    and compress poorly). Opening each block once per partition instead made compaction cost
    as much as a tenth of prepare (192 small files per block). Returns files written."""
    import pyarrow.parquet as pq

    staged = storage.join(out, split, STAGE_DIR)
    if not storage.exists(staged):
        return 0
    group = group_rows or row_group_rows(seq_len)
    sinks = {k: _PartitionSink(out, split, k, group) for k in ks}
    for path in storage.list_files(staged, (".parquet",)):
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as f:
            staged_file = pq.ParquetFile(f)
            present = json.loads(staged_file.schema_arrow.metadata[STAGE_KEY.encode()])
            for i, k in enumerate(present):
                if k in sinks:
                    rows = staged_file.read_row_group(i).replace_schema_metadata(None)
                    sinks[k].add(rows)
    return sum(sink.close() for sink in sinks.values())


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


def compact_partitions(
    out: str, splits: list[str], seq_len: int, partitions: int = PARTITIONS
) -> dict[str, int]:
    """Compact every partition of these splits (Ray tasks, a few partitions each, all splits'
    tasks at once); drop the stages. Returns the number of files each split now has."""
    import ray

    remote = ray.remote(num_cpus=1)(compact_many)
    step = COMPACT_TASK_PARTITIONS
    groups = [list(range(i, min(i + step, partitions))) for i in range(0, partitions, step)]
    refs = {split: [remote.remote(out, split, g, seq_len) for g in groups] for split in splits}
    files = {split: sum(ray.get(r)) for split, r in refs.items()}
    for split in splits:
        storage.delete_dir(storage.join(out, split, STAGE_DIR))
    return files
