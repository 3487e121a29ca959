"""Training batches: which packed rows each rank reads, in which order, as tensors.

A row belongs to rank `row_key % world_size` (row_key is written by prepare), in the order of the
sorted shard files. Ray Train and torchrun use this same rule, so both launchers feed every rank
the same rows in the same order: their losses agree, and a resumed run can skip exactly the
micro-batches it already trained on. Under Ray the rows stream through Ray Data; under torchrun
they are read from Parquet directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from soulray import storage

COLUMNS = ["input_ids", "labels", "position_ids", "num_tokens"]
LIST_COLUMNS = COLUMNS[:3]
Batch = dict[str, torch.Tensor]
BatchSource = Callable[[], Iterator[pa.Table]]  # one pass (epoch) over a rank's rows


def shard_files(data_dir: str, split: str) -> list[str]:
    directory = storage.join(data_dir, split)
    if not storage.exists(directory):
        return []
    return storage.list_files(directory, (".parquet",))


def rank_filter(world_size: int, rank: int) -> Any:
    """The Ray Data filter expression selecting one rank's rows."""
    from ray.data.expressions import col

    return (col("row_key") % world_size) == rank


def read_rank_rows(files: list[str], world_size: int, rank: int) -> pa.Table:
    """torchrun path: this rank's rows, read directly from the Parquet shards."""
    import pyarrow.parquet as pq

    tables = []
    for path in files:
        fs, inner = storage.resolve(path)
        table = pq.read_table(inner, filesystem=fs, columns=[*COLUMNS, "row_key"])
        mine = table["row_key"].to_numpy() % world_size == rank
        tables.append(table.filter(pa.array(mine)).select(COLUMNS))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in COLUMNS})


def table_batches(table: pa.Table, micro_batch_size: int) -> BatchSource:
    """A batch source over an in-memory table (the torchrun path)."""

    def one_pass() -> Iterator[pa.Table]:
        for start in range(0, table.num_rows, micro_batch_size):
            yield table.slice(start, micro_batch_size)

    return one_pass


def ray_batches(shard: Any, micro_batch_size: int) -> BatchSource:
    """A batch source over a Ray Train dataset shard (the Ray path)."""

    def one_pass() -> Iterator[pa.Table]:
        yield from shard.iter_batches(
            batch_size=micro_batch_size, batch_format="pyarrow", prefetch_batches=2
        )

    return one_pass


def to_tensors(batch: pa.Table, device: torch.device) -> Batch:
    """Fixed-length list columns -> (rows, seq_len) int64 tensors on the device, plus the
    number of real (non-pad) tokens in the batch."""
    out = {}
    for name in LIST_COLUMNS:
        column = batch.column(name).combine_chunks()
        flat = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
        out[name] = torch.from_numpy(flat.reshape(len(column), -1)).to(device, non_blocking=True)
    out["num_tokens"] = torch.tensor(pa.compute.sum(batch.column("num_tokens")).as_py() or 0)
    return out


def cycle(source: BatchSource, skip: int = 0) -> Iterator[pa.Table]:
    """Micro-batches forever, epoch after epoch, after skipping the first `skip` of them."""
    seen = 0
    while True:
        empty = True
        for batch in source():
            empty = False
            if seen >= skip:
                yield batch
            seen += 1
        if empty:
            raise ValueError(
                "this rank has no training rows: the prepared train split has fewer packed rows "
                "than train.num_workers; prepare more data or use fewer workers"
            )


def load_run_tokenizer(data_dir: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer prepare saved beside the data (downloaded first if it is remote)."""
    import tempfile

    from soulray.data.tokenizer import load_tokenizer, write_tokenizer_files

    directory = storage.join(data_dir, "tokenizer")
    if not storage.exists(directory):
        raise ValueError(
            f"no tokenizer at {directory}: train.data_dir must be the output of `soulray "
            "prepare` (run it first, or point train.data_dir at its data.output_dir)"
        )
    if not storage.is_remote(directory):
        return load_tokenizer(storage.normalize(directory), trust_remote_code)
    files = {f.rsplit("/", 1)[-1]: storage.read_bytes(f) for f in storage.list_files(directory)}
    local = write_tokenizer_files(files, tempfile.mkdtemp(prefix="soulray-tok-"))
    return load_tokenizer(str(local), trust_remote_code)
