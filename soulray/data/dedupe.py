"""Global dedupe and prefix collapse through Ray Data, without the corpus on the driver.

Every kept record contributes one small key row for its content hash ("self") and one for each
proper prefix ending with an assistant turn ("prefix"). Key rows are grouped by a hash bucket
(a hash-partitioned aggregation: every row of one hash lands in the same group), and each group
decides, per hash:
- a hash that is also some record's prefix: every record with it is a sample of a
  per-turn-expanded dialogue and is collapsed into the longest one (SoulChat's 2.3M samples
  are 258K dialogues); it never trains, and neither does any prefix of a validation dialogue;
- otherwise the first record in input order (range, then record) is kept; later ones are
  duplicates, rejected with the first one's location.
Only the decisions (one row per dropped record) leave the shuffle.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

BUCKETS = 256  # hash buckets: groups of a few thousand key rows at 1M records
STAT_COLUMNS = ["turns", "target_turns", "merged_turns", "empty_turns", "strategies_dropped"]
KEY_SOURCE_COLUMNS = ["hash", "prefixes", "range_id", "record_index", "location", "split"]
KEY_SOURCE_COLUMNS += [*STAT_COLUMNS, "unknown_strategies"]
KEY_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("key", pa.string()),
        ("kind", pa.int8()),  # 0: the record's own hash, 1: a prefix's
        ("range_id", pa.int32()),
        ("record_index", pa.int32()),
        ("location", pa.string()),  # the rest: null on prefix rows
        ("split", pa.string()),
        *[(c, pa.int64()) for c in STAT_COLUMNS],
        ("unknown_strategies", pa.string()),
    ]
)
DROP_SCHEMA = pa.schema(
    [
        ("range_id", pa.int32()),
        ("record_index", pa.int32()),
        ("reason", pa.string()),  # "duplicate" or "collapsed"
        ("detail", pa.string()),
        ("split", pa.string()),
        *[(c, pa.int64()) for c in STAT_COLUMNS],
        ("unknown_strategies", pa.string()),
    ]
)


def key_rows(batch: pa.Table) -> pa.Table:
    """Parsed rows -> key rows: one self row, plus one row per prefix hash (kind 1)."""
    prefixes = batch.column("prefixes")
    n_prefix = pa.compute.list_value_length(prefixes).to_numpy(zero_copy_only=False)
    owners = pa.compute.list_parent_indices(prefixes)
    prefix_keys = pa.compute.list_flatten(prefixes)
    self_part = batch.drop_columns(["prefixes"]).rename_columns(
        ["key" if c == "hash" else c for c in batch.drop_columns(["prefixes"]).column_names]
    )
    self_part = self_part.append_column("kind", pa.array([0] * batch.num_rows, pa.int8()))
    prefix_part = pa.table(
        {
            "key": prefix_keys,
            "range_id": batch.column("range_id").take(owners),
            "record_index": batch.column("record_index").take(owners),
            "kind": pa.array([1] * int(n_prefix.sum()), pa.int8()),
        }
    )
    rows = pa.concat_tables([self_part, prefix_part], promote_options="default")
    buckets = [int(k[:2], 16) % BUCKETS for k in rows.column("key").to_pylist()]
    rows = rows.append_column("bucket", pa.array(buckets, pa.int32()))
    return rows.select(KEY_SCHEMA.names).cast(KEY_SCHEMA)


def decide_bucket(group: pa.Table) -> pa.Table:
    """One bucket's key rows -> the records to drop (duplicates and collapsed prefixes)."""
    selves: dict[str, list[dict[str, Any]]] = {}
    prefixed: set[str] = set()
    for row in group.to_pylist():
        if row["kind"]:
            prefixed.add(row["key"])
        else:
            selves.setdefault(row["key"], []).append(row)
    drops = []
    for key, rows in selves.items():
        rows.sort(key=lambda r: (r["range_id"], r["record_index"]))
        if key in prefixed:
            drops += [drop_row(r, "collapsed", "a prefix of a longer dialogue") for r in rows]
        else:
            detail = f"same messages as {rows[0]['location']}"
            drops += [drop_row(r, "duplicate", detail) for r in rows[1:]]
    return pa.Table.from_pylist(drops, schema=DROP_SCHEMA)


def drop_row(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    keep = ["range_id", "record_index", "split", *STAT_COLUMNS, "unknown_strategies"]
    return {k: row[k] for k in keep} | {"reason": reason, "detail": detail}


def find_drops(keys: Any, work: str, partitions: int) -> tuple[Counter, Counter]:
    """Group the key rows by hash bucket, decide, and write each range's drops under
    work/drops/<range>/; return (counts, unknown strategies) of the dropped records."""
    import functools

    totals = (
        keys.groupby("bucket", num_partitions=partitions)
        .map_groups(decide_bucket, batch_format="pyarrow")
        .map_batches(functools.partial(save_drops, work=work), batch_format="pyarrow")
        .take_all()
    )
    counts: Counter = Counter()
    unknown: Counter = Counter()
    for row in totals:
        counts.update(json.loads(row["counts"]))
        unknown.update(json.loads(row["unknown"]))
    return counts, unknown


def save_drops(batch: pa.Table, work: str) -> pa.Table:
    """Write a block of decisions as one file per range (a retried block writes the same rows
    again under another name: harmless, they only filter); return its counts as one row."""
    import uuid

    import pyarrow.parquet as pq

    from soulray import storage

    name = f"{uuid.uuid4().hex}.parquet"
    ranges = batch.column("range_id")
    for rid in pa.compute.unique(ranges).to_pylist():
        part = batch.filter(pa.compute.equal(ranges, rid))
        path = storage.join(work, "drops", f"{rid:06d}", name)
        fs, inner = storage.resolve(path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        pq.write_table(part, inner, filesystem=fs)
    return summarize_drops(batch)


def summarize_drops(batch: pa.Table) -> pa.Table:
    """Counts and turn sums of dropped records per (reason, split), as one JSON row."""
    counts: Counter = Counter()
    unknown: Counter = Counter()
    for row in batch.to_pylist():
        counts[f"{row['reason']}/{row['split']}"] += 1
        for c in STAT_COLUMNS:
            counts[f"{row['reason']}.{c}"] += row[c]
        unknown.update(json.loads(row["unknown_strategies"]))
    return pa.table({"counts": [json.dumps(counts)], "unknown": [json.dumps(unknown)]})
