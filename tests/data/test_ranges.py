"""One big file parsed as byte ranges gives exactly the records of the serial reader.

The scan chunk is shrunk to a few bytes, so chunk edges fall inside strings, inside escape runs
and between a backslash and the quote it escapes; every range is then parsed on its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from soulray.data import ranges
from soulray.data.formats import split_records
from soulray.data.ranges import plan_ranges, range_records

TRICKY = [
    {"messages": [{"role": "user", "content": 'he said "[{,}]" and left \\'}]},
    {"a": [[1, 2], [3, [4, {"b": "]]],[[{"}]]], "s": "\\\\", "t": '\\"', "u": '\\\\"x'},
    "just a string, with ] and [ and , and {",
    123,
    None,
    [],
    {},
    {"zh": "你好，世界「」,]}", "esc": '\u2028\t\n"\\/'},
    [[[["deep", {"x": [",", "]", "\\", '"']}]]]],
    {"messages": [{"role": "assistant", "content": "\\" * 7 + '"'}]},
]


def serial(path: Path) -> list[tuple]:
    return [
        (r.location, r.key, r.record, r.raw, r.error and r.error.reason)
        for r in split_records(str(path), path.read_bytes())
    ]


def by_ranges(path: Path, range_bytes: int) -> tuple[list[tuple], list]:
    plan = plan_ranges([str(path)], range_bytes)
    got = [
        (r.location, r.key, r.record, r.raw, r.error and r.error.reason)
        for rng in plan
        for r in range_records(rng)
    ]
    return got, plan


def tricky_corpus(n: int, seed: int) -> list:
    rng = random.Random(seed)
    items = [rng.choice(TRICKY) for _ in range(n)]
    return [x | {"i": i} if isinstance(x, dict) and i % 3 else x for i, x in enumerate(items)]


@pytest.mark.parametrize("chunk", [11, 64, 1000])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_ranges_equal_the_serial_parse(ray_local, tmp_path, monkeypatch, chunk, indent):
    monkeypatch.setattr(ranges, "SCAN_CHUNK", chunk)
    records = tricky_corpus(500, chunk)
    path = tmp_path / "corpus.json"
    path.write_text("\ufeff \n" + json.dumps(records, ensure_ascii=False, indent=indent) + "\n ")
    got, plan = by_ranges(path, 4096)
    assert {r.kind for r in plan} == {"array"} and len(plan) >= 4
    assert got == serial(path)
    assert [g[2] for g in got] == records  # and the values are the file's records, in order
    assert [r.rid for r in plan] == list(range(len(plan)))


def test_ranges_cover_every_record_once_at_any_range_size(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(ranges, "SCAN_CHUNK", 97)
    records = tricky_corpus(200, 1)
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(records))
    expected = serial(path)
    for range_bytes in (4096, 5000, 9999, path.stat().st_size - 1):
        got, plan = by_ranges(path, range_bytes)
        assert got == expected, range_bytes
        assert plan[0].first == 0 and all(
            b.first == a.first + len(a.starts) for a, b in zip(plan, plan[1:], strict=False)
        )


@pytest.mark.parametrize("chunk", [53, 4096])
def test_two_arrays_joined_are_one_reject_at_any_range_size(
    ray_local, tmp_path, monkeypatch, chunk
):
    """Two arrays joined with `cat`: the whole-file reader refuses the file as more than one
    JSON value; the split reader read their records, with the two at the join one bad record
    ("Extra data") and every later index one off, depending on range_bytes."""
    monkeypatch.setattr(ranges, "SCAN_CHUNK", chunk)
    half = json.dumps(tricky_corpus(60, 2), indent=1)
    path = tmp_path / "corpus.json"
    path.write_text(half + "\n" + half + "\n\n  ")
    expected = serial(path)
    assert [(g[0], g[4]) for g in expected] == [(str(path), "invalid_json")]
    for range_bytes in (500, 4096):
        got, plan = by_ranges(path, range_bytes)
        assert got == expected, range_bytes


def test_jsonl_ranges_keep_line_numbers(ray_local, tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in tricky_corpus(400, 2)]
    lines[5] = '{"messages": ['  # a broken line
    lines[9] = ""  # a blank line
    lines[17] = lines[17] + "\r"  # a CRLF line
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got, plan = by_ranges(path, 4096)
    assert {r.kind for r in plan} == {"lines"} and len(plan) >= 4
    assert got == serial(path)
    # only the broken line is rejected: the U+2028 inside a string does not end a line
    assert [(g[0], g[4]) for g in got if g[4]] == [(f"{path}:6", "invalid_json")]
    assert len(got) == 399


def test_a_big_json_file_holding_json_lines_is_split_at_newlines(ray_local, tmp_path):
    """JSON lines saved as .json are read line by line; a big one was one task holding the
    whole file. A .json holding one record on one line is still read whole, as one record."""
    lines = [json.dumps(r, ensure_ascii=False) for r in tricky_corpus(300, 3) if r is not None]
    lines[4] = '{"messages": ['  # a broken line
    path = tmp_path / "corpus.json"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    got, plan = by_ranges(path, 4096)
    assert {r.kind for r in plan} == {"lines"} and len(plan) >= 4
    assert got == serial(path) and len(got) == len(lines)
    assert [(g[0], g[4]) for g in got if g[4]] == [(f"{path}:5", "invalid_json")]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 10000}]}) + "\n")
    got, plan = by_ranges(one, 4096)
    assert [r.kind for r in plan] == ["file"] and [g[0] for g in got] == [str(one)]


def test_a_big_parquet_file_is_split_by_row_groups(tmp_path):
    """A big Parquet file was one task holding the whole file; its row groups are ranges now,
    read as the serial reader reads them (same locations and values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [
        {"id": i, "messages": [{"role": "user", "content": f"x{i} " * 50}]} for i in range(300)
    ]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=20)
    got, plan = by_ranges(path, 4096)
    assert {r.kind for r in plan} == {"parquet"} and len(plan) == 15
    assert [r.first for r in plan] == list(range(0, 300, 20))
    assert got == serial(path) and [g[2] for g in got] == records
    one = tmp_path / "one.parquet"  # one row group: read whole, as before
    pq.write_table(pa.Table.from_pylist(records), one)
    got, plan = by_ranges(one, 4096)
    assert [r.kind for r in plan] == ["file"] and got == serial(one)


def test_small_files_share_ranges_up_to_range_bytes(tmp_path):
    """A folder of small files (SMILE ships one dialogue per file) was one Ray task per file;
    consecutive small files now share a range, read as the serial reader reads each one."""
    paths = []
    for i in range(40):
        path = tmp_path / f"{i:02d}.json"
        path.write_text(json.dumps([{"role": "client", "content": "z" * 173 + f"{i:02d}"}]))
        paths.append(path)
    broken = tmp_path / "40.json"
    broken.write_text('[{"role": "client", "content": "cut sh')
    paths.append(broken)
    plan = plan_ranges([str(p) for p in paths], 4096)
    sizes = [p.stat().st_size for p in paths]
    assert sizes == [210] * 40 + [38] and len(plan) == 3
    assert [(r.kind, len(r.paths), r.rid) for r in plan] == [
        ("files", 19, 0),
        ("files", 19, 1),
        ("files", 3, 2),
    ]
    got = [
        (r.location, r.record, r.error and r.error.reason)
        for rng in plan
        for r in range_records(rng)
    ]
    want = [(g[0], g[2], g[4]) for p in paths for g in serial(p)]
    assert got == want and len(got) == 41 and got[-1][2] == "invalid_json"


def test_a_jsonl_file_holding_one_pretty_printed_array_is_read_as_the_json_it_is(tmp_path):
    """json.dump(items, f, indent=2) saved as .jsonl: read as lines, each of its lines was a
    reject (886 for 5 conversations); big (split) or small (whole), it gives the .json's records.
    A JSON-lines file whose records are lists (SMILE) is still read by lines."""
    records = tricky_corpus(300, 5)
    text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    as_json, as_jsonl = tmp_path / "corpus.json", tmp_path / "corpus.jsonl"
    as_json.write_text(text)
    as_jsonl.write_text("\ufeff" + text)
    expected = [(g[0].replace(".json[", ".jsonl["), *g[1:]) for g in serial(as_json)]
    assert serial(as_jsonl) == expected
    got, plan = by_ranges(as_jsonl, 4096)
    assert {r.kind for r in plan} == {"array"} and len(plan) >= 4
    assert got == expected and [g[2] for g in got] == records
    smile = tmp_path / "smile.jsonl"
    turns = [[{"role": "user", "content": f"hi {i}"}] for i in range(3)]
    smile.write_text("".join(json.dumps(t) + "\n" for t in turns))
    assert [(g[0], g[2]) for g in serial(smile)] == [
        (f"{smile}:{i + 1}", t) for i, t in enumerate(turns)
    ]


def test_files_that_cannot_be_split_are_read_whole(ray_local, tmp_path):
    one = tmp_path / "one.json"  # a single (big) record, not an array
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 10000}]}))
    smile = tmp_path / "smile.json"  # ONE SMILE conversation: a list of turns
    smile.write_text(json.dumps([{"role": "client", "content": "y" * 100}] * 100))
    broken = tmp_path / "broken.json"  # unbalanced: the serial reader rejects the file
    broken.write_text("[" + json.dumps(TRICKY) * 50)
    for path in (one, smile, broken):
        got, plan = by_ranges(path, 4096)
        assert [r.kind for r in plan] == ["file"]
        assert got == serial(path)
    assert by_ranges(broken, 4096)[0][0][4] == "invalid_json"


def test_a_bad_record_inside_a_split_array_is_rejected_alone(ray_local, tmp_path):
    good = json.dumps(tricky_corpus(100, 3))
    path = tmp_path / "corpus.json"
    path.write_text(good[:-1] + ", {1: 2}, tru]")  # two bad items at the end
    got, _ = by_ranges(path, 4096)
    assert [g[4] for g in got[:100]] == [None] * 100
    assert [(g[0], g[3], g[4]) for g in got[100:]] == [
        (f"{path}[100]", "{1: 2}", "invalid_json"),
        (f"{path}[101]", "tru", "invalid_json"),
    ]


def test_a_bad_record_in_a_small_array_is_rejected_alone_as_in_a_big_one(ray_local, tmp_path):
    """A file read whole (under range_bytes) used to be one invalid_json reject for all its
    records; now its records are read one by one, exactly as the split reader reads them."""
    good = json.dumps(tricky_corpus(40, 5))
    path = tmp_path / "corpus.json"
    path.write_bytes(b"\xef\xbb\xbf" + (good[:-1] + ', {"trailing": 1,}, tru]').encode())
    whole, plan = by_ranges(path, 10**9)
    assert [r.kind for r in plan] == ["file"]
    split, plan = by_ranges(path, 200)
    assert len(plan) > 1 and whole == split == serial(path)
    assert [g[4] for g in whole[:40]] == [None] * 40
    assert [(g[0], g[3], g[4]) for g in whole[40:]] == [
        (f"{path}[40]", '{"trailing": 1,}', "invalid_json"),
        (f"{path}[41]", "tru", "invalid_json"),
    ]


def test_a_trailing_comma_after_the_last_record_is_no_record(ray_local, tmp_path):
    """'[a, b,]' (not JSON, a common hand edit) gives a and b, read whole or split, and no
    empty phantom record rejected at [2]."""
    items = tricky_corpus(30, 7)
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(items, indent=1))
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(items, indent=1)[:-1].rstrip() + ",\n]\n")
    whole, plan = by_ranges(path, 10**9)
    assert [r.kind for r in plan] == ["file"]
    split, plan = by_ranges(path, 200)
    assert len(plan) > 1 and whole == split == serial(path)
    assert len(whole) == 30 and [g[4] for g in whole] == [None] * 30
    assert [g[2] for g in whole] == [r[2] for r in serial(clean)]


def test_an_array_that_does_not_balance_says_the_whole_file_was_skipped(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text('[{"messages": []}, {"messages": [}, {"messages": []}]')
    ((loc, _, record, _, reason),) = serial(path)
    (raw,) = split_records(str(path), path.read_bytes())
    assert (loc, record, reason) == (str(path), None, "invalid_json")
    assert "the whole file was skipped: its brackets or quotes do not balance" in raw.error.detail
    one = '[{"messages": []},\n{"messages": []}]\n'
    path.write_text(one + one)  # two files joined with cat
    (raw,) = split_records(str(path), path.read_bytes())
    assert raw.error.detail == (
        "line 3 col 1: Extra data; the whole file was skipped: it holds more than one JSON "
        "value; merge them into one array, or write one record per line in a .jsonl file"
    )


def test_a_big_utf16_file_is_one_reject_that_says_so(tmp_path):
    """Split at newlines, every UTF-16 line would be a 'not UTF-8' reject of its own."""
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 50}]})
    path = tmp_path / "big.jsonl"
    path.write_bytes(("\n".join([line] * 400) + "\n").encode("utf-16"))
    ranges = plan_ranges([str(path)], range_bytes=4096)
    assert len(ranges) == 1 and ranges[0].kind == "file"
    (only,) = [r for rng in ranges for r in range_records(rng)]
    assert only.error.reason == "invalid_encoding"
    assert only.error.detail.startswith("the file is UTF-16, not UTF-8; convert it")


def test_a_corrupt_row_group_of_a_split_parquet_file_is_one_reject(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": [{"role": "user", "content": f"y{i} " * 60}]} for i in range(100)]
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=25)
    data = bytearray(path.read_bytes())
    at = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[at : at + 16] = b"\xff" * 16  # the page header of row group 1
    path.write_bytes(bytes(data))
    got, plan = by_ranges(path, 4096)
    assert [r.first for r in plan] == [0, 25, 50, 75]
    bad = [g for g in got if g[4]]
    assert [(g[0], g[4]) for g in bad] == [(f"{path}[25]", "invalid_json")]
    assert [g[2] for g in got if not g[4]] == records[:25] + records[50:]
