"""The read stage of `soulray prepare`: ranges of records -> cleaned, hashed rows on disk.

Each range task writes its kept rows to <work>/parsed/<range>.parquet, its rejected records to
<work>/rejects/ and its counts to <work>/stats/, and passes on only small key rows to dedupe
(dedupe.py), whose decisions are written per range (<work>/drops/<range>/): loading a range's
kept rows is then a join by position. Memory is
bounded by a range's size times the number of tasks, whatever the corpus size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from soulray import storage
from soulray.data.conversation import (
    RecordError,
    check_encodable,
    clean_conversation,
    count_target_turns,
)
from soulray.data.dedupe import KEY_SOURCE_COLUMNS, STAT_COLUMNS, find_drops, key_rows
from soulray.data.formats import RawRecord, detect_format
from soulray.data.ranges import Range, plan_ranges, range_records

log = logging.getLogger("soulray.prepare")


@dataclass(frozen=True)
class ParseSettings:
    format: str
    lookup: dict[str, str]
    fallback: str
    system_prompt: str | None
    val_fraction: float
    seed: int = 0  # data.seed


def split_of(split_hash: str, val_fraction: float, seed: int = 0) -> str:
    """Stable train/val assignment from the conversation's split hash (its opening's, see
    Conversation.content_hashes: never per turn, and one side for dialogues that branch).
    Another seed draws another split; seed 0 is the hash as it is."""
    if seed:
        split_hash = hashlib.blake2b(f"{seed}:{split_hash}".encode(), digest_size=4).hexdigest()
    return "val" if int(split_hash[:8], 16) / 0x1_0000_0000 < val_fraction else "train"


def normalize_record(raw: RawRecord, s: ParseSettings) -> dict[str, Any]:
    """One record -> one row: the cleaned conversation, or the reason it was rejected."""
    row: dict[str, Any] = {"location": raw.location, "ok": False, "reason": "", "detail": ""}
    row |= {"raw": "", "conversation": "", "hash": "", "prefixes": [], "split": "", "turns": 0}
    row |= {"target_turns": 0, "merged_turns": 0, "empty_turns": 0, "strategies_dropped": 0}
    row |= {"unknown_strategies": "{}"}
    try:
        if raw.error:
            raise raw.error
        from soulray.data.formats import forced_format_error, to_conversation

        fmt = detect_format(raw.record) if s.format == "auto" else s.format
        try:
            conv = to_conversation(raw.record, fmt, raw.key)
        except RecordError as e:
            raise e if s.format == "auto" else forced_format_error(raw.record, fmt, e) from None
        check_encodable(conv)
        conv, stats = clean_conversation(conv, s.lookup, s.fallback, s.system_prompt)
    except RecordError as e:
        return row | {"reason": e.reason, "detail": e.detail, "raw": raw.source_text()}
    digest, prefixes, opening = conv.content_hashes()
    return row | {
        "ok": True,
        "conversation": conv.to_json(),
        "hash": digest,
        "prefixes": prefixes,
        "split": split_of(opening, s.val_fraction, s.seed),
        "turns": len(conv.messages),
        "target_turns": count_target_turns(conv.messages),
        "merged_turns": stats.merged_turns,
        "empty_turns": stats.empty_turns,
        "strategies_dropped": stats.strategies_dropped,
        "unknown_strategies": json.dumps(stats.unknown_strategies, ensure_ascii=False),
    }


ROW_COLUMNS = [
    c for c in ["conversation", *KEY_SOURCE_COLUMNS] if c not in ("range_id", "record_index")
]


def parse_range(batch: pa.Table, settings: ParseSettings, work: str) -> pa.Table:
    """Ray Data map_batches over one range: its kept rows to work/parsed/<range>.parquet, its
    rejected records to work/rejects/<range>.a.jsonl, its counts to work/stats/<range>.json;
    returns only the small key rows that dedupe needs."""
    import pyarrow.parquet as pq

    r = Range(**json.loads(batch.column("spec")[0].as_py()))
    rows: list[dict[str, Any]] = []
    rejects: list[str] = []
    rejected: Counter = Counter()
    sums: Counter = Counter()
    unknown: Counter = Counter()
    by_split: Counter = Counter()
    first_error, records = "", 0
    for i, raw in enumerate(range_records(r)):
        records += 1
        row = normalize_record(raw, settings)
        if not row["ok"]:
            rejected[row["reason"]] += 1
            first_error = first_error or f"{row['location']}: {row['reason']}: {row['detail']}"
            reject = {k: row[k] for k in ("reason", "detail", "location")}
            rejects.append(json.dumps(reject | {"record": row["raw"]}, ensure_ascii=False))
            continue
        rows.append({k: row[k] for k in ROW_COLUMNS} | {"range_id": r.rid, "record_index": i})
        by_split[row["split"]] += 1
        sums.update({c: row[c] for c in STAT_COLUMNS})
        unknown.update(json.loads(row["unknown_strategies"]))
    table = pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)
    if rows:
        fs, inner = storage.resolve(storage.join(work, "parsed", f"{r.rid:06d}.parquet"))
        pq.write_table(table, inner, filesystem=fs)
    if rejects:
        path = storage.join(work, "rejects", f"{r.rid:06d}.a.jsonl")
        storage.write_text(path, "".join(line + "\n" for line in rejects))
    counts = {"rid": r.rid, "records": records, "rejected": rejected, "sums": sums}
    counts |= {"unknown": unknown, "by_split": by_split, "first_error": first_error}
    storage.write_text(storage.join(work, "stats", f"{r.rid:06d}.json"), json.dumps(counts))
    return key_rows(table.select(KEY_SOURCE_COLUMNS))


PARSED_SCHEMA = pa.schema(
    [
        ("conversation", pa.string()),
        ("hash", pa.string()),
        ("prefixes", pa.list_(pa.string())),
        ("range_id", pa.int32()),
        ("record_index", pa.int32()),
        ("location", pa.string()),
        ("split", pa.string()),
        *[(c, pa.int64()) for c in STAT_COLUMNS],
        ("unknown_strategies", pa.string()),
    ]
)
KEPT_COLUMNS = ["conversation", "split", "hash", "location"]


def load_kept(batch: pa.Table, work: str) -> pa.Table:
    """Ray Data map_batches over range ids: one range's kept rows, less its dropped records
    (their decisions sit in work/drops/<range>/: a join by position, not a shuffle).
    Duplicates go to work/rejects/<range>.b.jsonl with the conversation as parsed (soulray's
    form, not the file's text) and the location of the record."""
    import pyarrow.parquet as pq

    rid = batch.column("rid")[0].as_py()
    fs, parsed = storage.resolve(parsed_path(work, rid))
    table = pq.read_table(parsed, columns=[*KEPT_COLUMNS, "record_index"], filesystem=fs)
    fs, drops_dir = storage.resolve(storage.join(work, "drops", f"{rid:06d}"))
    if fs.get_file_info(drops_dir).type == pafs.FileType.NotFound:
        return table.select(KEPT_COLUMNS)
    drops = pq.read_table(drops_dir, filesystem=fs, partitioning=None)
    dropped = pa.compute.is_in(table.column("record_index"), drops.column("record_index"))
    dup = drops.filter(pa.compute.equal(drops.column("reason"), "duplicate"))
    if dup.num_rows:
        index = dup.column("record_index").to_pylist()
        detail = dict(zip(index, dup.column("detail").to_pylist(), strict=True))
        lines = []
        for row in table.filter(dropped).to_pylist():
            if row["record_index"] in detail:
                reject = {"reason": "duplicate", "detail": detail[row["record_index"]]}
                reject |= {"location": row["location"], "record": row["conversation"]}
                lines.append(json.dumps(reject, ensure_ascii=False) + "\n")
        storage.write_text(storage.join(work, "rejects", f"{rid:06d}.b.jsonl"), "".join(lines))
    return table.filter(pa.compute.invert(dropped)).select(KEPT_COLUMNS)


class KeptLoader:
    """`load_kept` as a Ray Data actor. Rendering paces the loader (the render queue is capped),
    so a loader task pool would sit idle between ranges, and Ray reaps idle workers within a
    second and starts fresh ones (seconds of imports each, on the CPUs rendering needs)."""

    def __init__(self, work: str):
        self.work = work

    def __call__(self, batch: pa.Table) -> pa.Table:
        return load_kept(batch, self.work)


@dataclass
class ParseSummary:
    records: int
    kept: int
    rejected: Counter
    sums: Counter  # turns, target_turns, merged_turns, empty_turns of kept conversations
    kept_by_split: Counter
    unknown_strategies: Counter
    collapsed: int = 0  # samples of per-turn-expanded dialogues folded into the longest one
    first_error: str = ""  # "location: reason: detail" of the first rejected record


def summarize_ranges(stats: list[dict[str, Any]]) -> ParseSummary:
    """Sum the per-range counts (before dedupe): in range order, so first_error is the first."""
    s = ParseSummary(0, 0, Counter(), Counter(), Counter(), Counter())
    for c in sorted(stats, key=lambda r: r["rid"]):
        s.records += c["records"]
        s.rejected.update(c["rejected"])
        s.sums.update(c["sums"])
        s.kept_by_split.update(c["by_split"])
        s.unknown_strategies.update(c["unknown"])
        s.first_error = s.first_error or c["first_error"]
    s.kept = sum(s.kept_by_split.values())
    return s


def read_stats(work: str) -> list[dict[str, Any]]:
    """The per-range counts files (one small JSON per range)."""
    fs, inner = storage.resolve(storage.join(work, "stats"))
    stats = []
    for info in fs.get_file_info(pafs.FileSelector(inner)):
        with fs.open_input_stream(info.path) as f:
            stats.append(json.loads(f.read()))
    return stats


def apply_drops(s: ParseSummary, counts: Counter, unknown: Counter) -> None:
    """Take the dropped records (duplicates, collapsed prefixes) out of the kept counts."""
    for reason in ("duplicate", "collapsed"):
        for split in ("train", "val"):
            n = counts[f"{reason}/{split}"]
            s.kept_by_split[split] -= n
            s.kept -= n
            if reason == "collapsed":
                s.collapsed += n
            elif n:
                s.rejected["duplicate"] += n
        for c in STAT_COLUMNS:
            s.sums[c] -= counts[f"{reason}.{c}"]
    s.unknown_strategies.subtract(unknown)
    s.unknown_strategies = +s.unknown_strategies  # drop zero counts


def write_rejects(work: str, path: str, extra: list[str]) -> None:
    """rejects.jsonl: the per-range files in range order, then the render stage's files
    (`extra`, in that order); streamed, one file in memory at a time."""
    fs, inner = storage.resolve(storage.join(work, "rejects"))
    names = []
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(inner)))
    files = [(fs, name) for name in names] + [storage.resolve(f) for f in extra]
    out_fs, out_inner = storage.resolve(path)
    with out_fs.open_output_stream(out_inner) as out:
        for file_fs, name in files:
            with file_fs.open_input_stream(name) as f:
                out.write(f.read())


def parse_inputs(
    files: list[str], settings: ParseSettings, work: str, range_bytes: int
) -> tuple[ParseSummary, list[int]]:
    """Plan ranges; parse them in parallel into work/ and dedupe their key rows, in one Ray Data
    execution; return the summary and the ids of the ranges that kept rows. Per-range counts
    and per-block drop counts are all that reach the driver."""
    import ray.data

    ranges = plan_ranges(files, range_bytes)
    log.info("reading %d file(s) as %d range(s) of records", len(files), len(ranges))
    items = [{"rid": r.rid, "spec": json.dumps(asdict(r))} for r in ranges]
    if not items:
        return ParseSummary(0, 0, Counter(), Counter(), Counter(), Counter()), []
    keys = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        functools.partial(parse_range, settings=settings, work=work),
        batch_size=1,
        batch_format="pyarrow",
    )
    totals = find_drops(keys, work, partitions=max(1, min(64, len(items) // 4)))
    stats = read_stats(work)
    summary = summarize_ranges(stats)
    apply_drops(summary, *totals)
    return summary, sorted(c["rid"] for c in stats if c["by_split"])


def parsed_path(work: str, rid: int) -> str:
    return storage.join(work, "parsed", f"{rid:06d}.parquet")
