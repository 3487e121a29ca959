"""The partitioned write: staged block files become one file group per row_key % P, in full
row groups, every row exactly once and in a fixed order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from soulray.data import partition


def test_blocks_compact_into_full_row_groups_per_partition(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blocks = [np.sort(rng.integers(0, 2**40, 50)) for _ in range(30)]
    for b, keys in enumerate(blocks):
        table = pa.table({"row_key": keys, "x": keys % 7})
        staged = partition.write_block_partitions(table, str(tmp_path), "train", f"b{b:03d}", 4)
        assert staged == len(set((keys % 4).tolist()))
    stage = tmp_path / "train" / partition.STAGE_DIR
    assert sorted(p.name for p in stage.iterdir()) == [f"b{b:03d}.parquet" for b in range(30)]
    first = pq.ParquetFile(stage / "b000.parquet")  # one row group per partition, in order
    present = sorted(set((blocks[0] % 4).tolist()))
    assert first.metadata.num_row_groups == len(present)
    for i, k in enumerate(present):
        assert set((first.read_row_group(i)["row_key"].to_numpy() % 4).tolist()) == {k}
    files = [partition.compact_partition(str(tmp_path), "train", k, 2048, 16) for k in (0, 1)]
    files.append(partition.compact_many(str(tmp_path), "train", [2, 3], 2048, 16))
    assert files == [1, 1, 2]
    for k in range(4):
        f = pq.ParquetFile(tmp_path / "train" / f"part={k:03d}" / "rows-00000.parquet")
        groups = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
        expected = [b[b % 4 == k] for b in blocks]  # block (= staged name) order, key order
        assert f.read()["row_key"].to_pylist() == np.concatenate(expected).tolist()
        assert f.schema_arrow.metadata is None  # the stage's bookkeeping stays in the stage
        assert groups[:-1] == [16] * (len(groups) - 1) and 0 < groups[-1] <= 16
    assert partition.row_group_rows(2048) == 341  # 8 MiB of three int32 columns
