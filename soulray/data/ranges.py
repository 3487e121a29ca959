"""Split input files into byte ranges of whole records, so one big file is parsed by many tasks.

SoulChatCorpus ships as ONE JSON array of about 1 GB: parsed as one task it keeps one CPU busy
for a minute and one process holds the whole file. Here a big file is cut into ranges of about
`data.range_bytes`, each holding whole records, and every range is read with a ranged read
(local files and object stores alike, through pyarrow.fs):

- JSON lines (also in a .json): cut at newlines; each chunk task counts its newlines so every
  record keeps its `path:line` location.
- a JSON array: a first pass of chunk tasks finds the top-level separators. Whether a chunk
  starts inside a string is unknown until the chunks before it are counted, so each chunk is
  scanned (vectorised) under both hypotheses; the driver then chains the quote parities and
  bracket depths and keeps the commas at depth 1 of the right hypothesis. Escaped quotes and
  brackets inside strings are handled; the driver holds record offsets, never record text.
- Parquet: whole row groups (one range per group or run of groups of about range_bytes).
- small files, Parquet files of one row group, and a .json that is neither one array nor JSON
  lines: the whole file, read exactly as before (`formats.split_records`); consecutive small
  files share a range up to range_bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from soulray import storage
from soulray.data.conversation import RecordError
from soulray.data.formats import (
    RawRecord,
    line_records,
    looks_like_json_lines,
    opens_json_array,
    parquet_rows,
    parse_item,
    split_records,
)

SCAN_CHUNK = 16 * 2**20  # bytes per scan task: big enough to amortise, small enough for memory
JSON_LINES_HEAD = 2**20  # bytes of a .json read to tell JSON lines from one JSON value
LOOKBACK = 4096  # bytes read before a chunk to see a backslash run that crosses its start
WHITESPACE = b" \t\r\n"

# byte -> structural role outside strings: +1 opens, -1 closes, 2 is a comma
_ROLE = np.zeros(256, dtype=np.int8)
_ROLE[[ord("["), ord("{")]] = 1
_ROLE[[ord("]"), ord("}")]] = -1
_ROLE[ord(",")] = 2


@dataclass
class Range:
    """Whole records of one file: `file` = the whole file parsed as before, `lines` = JSON lines
    from byte `start` (a line start) to `end`, `array` = array records at `starts`..`ends`,
    `parquet` = the Parquet row groups numbered in `starts` (`first`: their first row's number),
    `files` = small files read whole one after the other (`paths`), `end` their total size."""

    rid: int
    path: str
    kind: str
    start: int = 0
    end: int = 0
    first: int = 0  # the first record's line number (lines) or index (array, parquet)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # files: the small files, `ends` their sizes


def read_at(path: str, offset: int, size: int) -> bytes:
    """A ranged read: only these bytes travel, from disk or an object store."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        return f.read_at(size, offset)


def file_size(path: str) -> int:
    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).size


# Scanning (runs in Ray tasks) ----------------------------------------------------------------


def count_newlines(path: str, start: int, end: int) -> tuple[int, int]:
    """(offset of the first newline at or after start, or -1; newlines in [start, end))."""
    data = read_at(path, start, end - start)
    first = data.find(b"\n")
    return (start + first if first >= 0 else -1), data.count(b"\n")


def unescaped_quotes(a: np.ndarray, pre: int, file_start: bool) -> np.ndarray:
    """Positions (>= pre) of the quotes that open or close strings: not after an odd run of
    backslashes. Escaped quotes are rare, so only those after a backslash are looked at."""
    q = np.flatnonzero(a == ord('"'))
    q = q[q >= pre]
    after_bs = q[(q > 0) & (a[np.maximum(q - 1, 0)] == ord("\\"))]
    escaped = []
    for p in after_bs.tolist():
        k = p - 1
        while k >= 0 and a[k] == ord("\\"):
            k -= 1
        if k < 0 and not file_start:
            raise ValueError(f"a run of over {LOOKBACK} backslashes; cannot split this file")
        if (p - 1 - k) % 2:
            escaped.append(p)
    return np.setdiff1d(q, np.array(escaped, dtype=q.dtype), assume_unique=True)


NONE = 1 << 40  # a depth no chunk reaches: the chunk has no such byte


def scan_array_chunk(path: str, start: int, end: int) -> tuple[dict[str, Any], Any, Any]:
    """Scan [start, end) of a JSON array under both hypotheses (h=0: the chunk starts outside a
    string, h=1: inside). Returns a summary and, per hypothesis, the file offsets of the commas
    at the chunk's lowest comma depth (the record separators, if that depth is 1)."""
    pre = min(start, LOOKBACK)
    a = np.frombuffer(read_at(path, start - pre, end - start + pre), dtype=np.uint8)
    quotes = unescaped_quotes(a, pre, start == pre) - pre
    role = _ROLE[a[pre:]]
    structural = np.flatnonzero(role)
    before = np.searchsorted(quotes, structural) & 1  # quotes before each structural byte
    summary: dict[str, Any] = {
        "quotes": int(len(quotes) & 1),
        "delta": [],
        "min_comma": [],
        "min_depth": [],  # the lowest depth the chunk reaches (NONE: no structural byte)
        "min_depth_but_last": [],  # ... before its last structural byte
    }
    candidates = []
    for h in (0, 1):
        pos = structural[(before ^ h) == 0]
        kind = role[pos]
        depth = np.cumsum(np.where(kind == 2, 0, kind), dtype=np.int64)
        commas = kind == 2
        at_comma = depth[commas]
        low = int(at_comma.min()) if len(at_comma) else NONE
        summary["delta"].append(int(depth[-1]) if len(depth) else 0)
        summary["min_comma"].append(low)
        summary["min_depth"].append(int(depth.min()) if len(depth) else NONE)
        summary["min_depth_but_last"].append(int(depth[:-1].min()) if len(depth) > 1 else NONE)
        candidates.append(pos[commas][at_comma == low].astype(np.int64) + start)
    return summary, candidates[0], candidates[1]


def _array_layout(data: bytes, cut_short: bool = False) -> tuple[np.ndarray, ...]:
    """(positions, kinds, depths) of the structural bytes outside strings, as the chunk scan
    finds them, and the string quotes' positions; cut_short: a string left open runs to the
    end of the data, so only what comes before it is scanned."""
    a = np.frombuffer(data, dtype=np.uint8)
    quotes = unescaped_quotes(a, 0, True)
    limit = int(quotes[-1]) if cut_short and len(quotes) % 2 else None
    structural = np.flatnonzero(_ROLE[a[:limit]])
    pos = structural[(np.searchsorted(quotes, structural) & 1) == 0]  # outside strings
    kind = _ROLE[a[pos]]
    depth = np.cumsum(np.where(kind == 2, 0, kind), dtype=np.int64)
    return pos, kind, depth, quotes


def _item_starts(pos: np.ndarray, kind: np.ndarray, depth: np.ndarray) -> tuple[list[int], ...]:
    """The commas between an array's items, and where each item starts."""
    seps = pos[(kind == 2) & (depth == 1)].tolist()
    return seps, [int(pos[0]) + 1, *(c + 1 for c in seps)]


def array_item_spans(data: bytes) -> list[tuple[int, int]] | None:
    """Byte spans of the items of one JSON array held whole in memory, found as the chunk scan
    finds them (commas at depth 1 outside strings); None when `data` is not one array with
    balanced brackets and strings. A small file whose array does not parse is read item by
    item with these, so one bad record costs that record, not the file."""
    pos, kind, depth, quotes = _array_layout(data)
    if len(quotes) % 2 or len(pos) < 2 or data[pos[0]] != ord("[") or data[pos[-1]] != ord("]"):
        return None
    if depth[-1] != 0 or (depth[:-1] < 1).any():
        return None
    seps, starts = _item_starts(pos, kind, depth)
    ends = [*seps, int(pos[-1])]
    spans = list(zip(starts, ends, strict=True))
    if spans and not data[spans[-1][0] : spans[-1][1]].strip():
        spans.pop()  # "[]", or a trailing comma after the last record: no record there
    return spans


def truncated_array_spans(data: bytes) -> tuple[list[tuple[int, int]], int] | None:
    """A JSON array cut short (an interrupted download or copy): the spans of its complete
    items and where the cut one starts; None when `data` does not read as the start of one
    array (it opens with something else, or closes it early)."""
    pos, kind, depth, _ = _array_layout(data, cut_short=True)
    if len(pos) < 1 or data[pos[0]] != ord("[") or (depth < 1).any():
        return None
    seps, starts = _item_starts(pos, kind, depth)
    return list(zip(starts[:-1], seps, strict=True)), starts[-1]


# Planning (driver) ---------------------------------------------------------------------------


def edge_bytes(path: str, size: int) -> tuple[int, int, int, int]:
    """(offset, byte) of the first and last non-whitespace bytes (a BOM skipped)."""
    head = read_at(path, 0, min(size, 4096))
    tail_at = max(0, size - 4096)
    tail = read_at(path, tail_at, size - tail_at)
    i = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    while i < len(head) and head[i] in WHITESPACE:
        i += 1
    j = len(tail) - 1
    while j >= 0 and tail[j] in WHITESPACE:
        j -= 1
    first = head[i] if i < len(head) else -1
    last = tail[j] if j >= 0 else -1
    return i, first, tail_at + j, last


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(size, s + chunk)) for s in range(0, size, chunk)]


def plan_lines(path: str, size: int, range_bytes: int, rid: int) -> list[Range]:
    """Cut a JSON-lines file at newlines near every multiple of range_bytes."""
    import ray

    task = ray.remote(count_newlines)
    chunks = chunk_bounds(size, range_bytes)
    found = ray.get([task.remote(path, s, e) for s, e in chunks])
    ranges: list[Range] = []
    start, line, seen = 0, 1, 0  # seen: newlines before chunk k
    for k, (first_nl, n) in enumerate(found):
        if k and first_nl >= 0 and first_nl + 1 > start and first_nl + 1 < size:
            ranges.append(Range(rid + len(ranges), path, "lines", start, first_nl + 1, line))
            line, start = seen + 2, first_nl + 1  # the newline at first_nl is number seen + 1
        seen += n
    ranges.append(Range(rid + len(ranges), path, "lines", start, size, line))
    return ranges


def array_separators(path: str, size: int) -> np.ndarray | None:
    """File offsets of the top-level commas of a JSON array, or None when the file is not one
    well-formed array (unbalanced brackets or an open string at the end)."""
    import ray

    task = ray.remote(num_returns=3)(scan_array_chunk)
    refs: list[Any] = [task.remote(path, s, e) for s, e in chunk_bounds(size, SCAN_CHUNK)]
    summaries = ray.get([r[0] for r in refs])
    inside, depth, chosen, closed = 0, 0, [], False
    for (_, ref0, ref1), s in zip(refs, summaries, strict=True):
        # the array closes at its last bracket, not before: two arrays joined with `cat` are
        # not one (the whole-file reader says so; the ranges made one bad record at the join)
        if closed and s["min_depth"][inside] != NONE:
            return None
        if depth + s["min_depth_but_last"][inside] < 1:
            return None
        closed = depth + s["min_depth"][inside] < 1
        if depth + s["min_comma"][inside] == 1:
            chosen.append(ref1 if inside else ref0)
        depth += s["delta"][inside]
        inside ^= s["quotes"]
    if depth != 0 or inside:
        return None
    parts = ray.get(chosen)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def plan_array(path: str, size: int, range_bytes: int, rid: int) -> list[Range] | None:
    """Records of a top-level JSON array grouped into ranges of about range_bytes."""
    open_at, first, close_at, last = edge_bytes(path, size)
    if first != ord("[") or last != ord("]"):
        return None
    seps = array_separators(path, size)
    if seps is None:
        return None
    starts = np.concatenate([[open_at + 1], seps + 1])
    ends = np.concatenate([seps, [close_at]])
    if not read_at(path, int(starts[-1]), int(ends[-1] - starts[-1])).strip():
        starts, ends = starts[:-1], ends[:-1]  # "[]", or a trailing comma after the last record
    if len(starts) == 0:
        return []
    at = np.searchsorted(starts, np.arange(starts[0], ends[-1], range_bytes), side="left")
    cuts = sorted({*at.tolist(), len(starts)} - {0})
    ranges: list[Range] = []
    lo = 0
    for hi in cuts:
        s, e = starts[lo:hi].tolist(), ends[lo:hi].tolist()
        ranges.append(Range(rid + len(ranges), path, "array", s[0], e[-1], lo, s, e))
        lo = hi
    return ranges


def first_array_item_is_turn(path: str, r: Range) -> bool:
    """A file that is ONE SMILE conversation (a list of turns) must stay whole."""
    from soulray.data.formats import is_turn_list

    try:
        item = json.loads(read_at(path, r.starts[0], r.ends[0] - r.starts[0]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return is_turn_list([item])


def plan_parquet(path: str, range_bytes: int, rid: int) -> list[Range] | None:
    """A Parquet file's row groups grouped into ranges of about range_bytes (uncompressed);
    None when it has one group or its footer does not read (the whole-file read rejects it)."""
    import pyarrow.parquet as pq

    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # pyarrow raises several types for a corrupt file
        return None
    if meta.num_row_groups < 2:
        return None
    ranges: list[Range] = []
    groups: list[int] = []
    first = size = rows = 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if size >= range_bytes or g == meta.num_row_groups - 1:
            ranges.append(Range(rid + len(ranges), path, "parquet", first=first, starts=groups))
            groups, first, size = [], rows, 0
    return ranges


def holds_json_lines(head: bytes) -> bool:
    """Whether a .json file whose first bytes are `head` holds JSON lines, which the serial
    reader reads line by line (formats.split_records): a big one is then split at newlines like
    a .jsonl (it was one task holding the whole file). Two or more lines, the first whole
    records among them parsing alone: one JSON value cannot be that."""
    text = head[: head.rfind(b"\n") + 1].decode("utf-8", errors="replace").removeprefix("\ufeff")
    return sum(1 for ln in text.split("\n") if ln.strip()) > 1 and looks_like_json_lines(text)


def plan_file(path: str, range_bytes: int, rid: int) -> list[Range]:
    """The ranges of one file: split when it is big and splittable, else the whole file."""
    size = file_size(path)
    suffix = PurePosixPath(path).suffix.lower()
    whole = [Range(rid, path, "file", 0, size)]
    if size <= range_bytes or read_at(path, 0, 2) in (b"\xff\xfe", b"\xfe\xff"):
        return whole  # small, or UTF-16 (one reject that says so: formats.split_records)
    if suffix == ".parquet":
        return plan_parquet(path, range_bytes, rid) or whole
    lines = suffix in (".jsonl", ".ndjson")
    if lines and not opens_json_array(read_at(path, 0, 4096)):
        return plan_lines(path, size, range_bytes, rid)
    if suffix == ".json" and holds_json_lines(read_at(path, 0, min(size, JSON_LINES_HEAD))):
        return plan_lines(path, size, range_bytes, rid)
    if lines or suffix == ".json":  # a .jsonl holding one JSON array is read as a .json
        ranges = plan_array(path, size, range_bytes, rid)
        if ranges is not None and not (ranges and first_array_item_is_turn(path, ranges[0])):
            return ranges
    return whole


def plan_ranges(files: list[str], range_bytes: int) -> list[Range]:
    """Every input file as ranges, numbered in file and byte order (the order of 'first')."""
    ranges: list[Range] = []
    for path in files:
        planned = plan_file(path, range_bytes, len(ranges))
        last = ranges[-1] if ranges else None
        if (
            last is not None
            and last.kind in ("file", "files")
            and [r.kind for r in planned] == ["file"]
            and last.end + planned[0].end <= range_bytes
        ):
            join_small_file(last, planned[0])
        else:
            ranges += planned
    return ranges


def join_small_file(r: Range, small: Range) -> None:
    """Add a small file to a range of small files, read whole one after the other: one task per
    file made a folder of small files (SMILE's 55,165 dialogues) thousands of tiny Ray tasks,
    blocks and work files, ~7x slower than the same records in one file."""
    if r.kind == "file":
        r.kind, r.paths, r.ends = "files", [r.path], [r.end]
    r.paths.append(small.path)
    r.ends.append(small.end)
    r.end += small.end


# Reading one range (runs in Ray tasks) ----------------------------------------------------------


def range_records(r: Range) -> Iterator[RawRecord]:
    """The records of one range, as the serial reader would yield them for that part of the
    file (same locations, keys and values)."""
    stem = PurePosixPath(r.path).stem
    match r.kind:
        case "file":
            yield from split_records(r.path, read_at(r.path, 0, r.end))
        case "files":
            for path, size in zip(r.paths, r.ends, strict=True):
                yield from split_records(path, read_at(path, 0, size))
        case "lines":
            data = read_at(r.path, r.start, r.end - r.start)
            if r.start == 0:
                data = data.removeprefix(b"\xef\xbb\xbf")  # as the whole-file reader does
            yield from line_records(r.path, stem, data, r.first)
        case "array":
            yield from _array_items(r, stem, read_at(r.path, r.start, r.end - r.start))
        case "parquet":
            import pyarrow.parquet as pq

            fs, inner = storage.resolve(r.path)
            try:
                with fs.open_input_file(inner) as f:
                    rows = pq.ParquetFile(f).read_row_groups(r.starts).to_pylist()
            except Exception as e:  # a corrupt row group: its range is one reject, not the job
                where = f"row groups {r.starts[0]}-{r.starts[-1]}"
                err = RecordError("invalid_json", f"bad Parquet ({where}): {e}")
                yield RawRecord(f"{r.path}[{r.first}]", f"{stem}:{r.first}", None, "", err)
                return
            yield from parquet_rows(r.path, stem, rows, r.first)
        case _:
            raise ValueError(f"unknown range kind {r.kind!r}")


def _array_items(r: Range, stem: str, data: bytes) -> Iterator[RawRecord]:
    for i, (s, e) in enumerate(zip(r.starts, r.ends, strict=True)):
        index = r.first + i
        yield parse_item(f"{r.path}[{index}]", f"{stem}:{index}", data[s - r.start : e - r.start])
