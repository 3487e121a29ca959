"""Bad input through the real `soulray prepare` command (a subprocess; each run starts its own
local Ray, so there are only three runs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from soulray_testing import SOULRAY

ROOT = Path(__file__).resolve().parents[2]

GOOD_1 = {
    "id": "good-1",
    "messages": [
        {"role": "user", "content": "I failed my exam."},
        {"role": "assistant", "content": "That sounds hard."},
    ],
}
GOOD_2 = {
    "id": "good-2",
    "messages": [
        {"role": "system", "content": "Be gentle."},
        {"role": "user", "content": "My cat died."},
        {"role": "assistant", "content": "I'm so sorry. How long were you together?"},
        {"role": "user", "content": "Twelve years."},
        {"role": "assistant", "content": "Twelve years is a lifetime of companionship."},
    ],
}
# (line text, reason it is rejected or None when it is kept)
LINES = [
    (json.dumps(GOOD_1), None),
    ('{"id": "broken", "messages": [{"role": "user", "content": "unterminated', "invalid_json"),
    ('{"id": "num", "messages": [{"role": "user", "content": 42}]}', "invalid_record"),
    ('{"id": "str", "messages": "hello"}', "invalid_record"),
    ('{"id": "empty", "messages": []}', "empty_conversation"),
    ('{"id": "blank", "messages": [{"role": "user", "content": "  "}]}', "empty_conversation"),
    ('{"id": "alone", "messages": [{"role": "user", "content": "Anyone?"}]}', "no_assistant_turn"),
    (json.dumps(GOOD_2), None),
    (json.dumps(GOOD_1 | {"id": "again"}), "duplicate"),
    ('{"text": "not a conversation"}', "unknown_format"),
    ("[1, 2, 3]", "unknown_format"),
    (  # half of an emoji (a broken export): no UTF-8 form, so rejected, not a failed job
        '{"id": "cut", "messages": [{"role": "user", "content": "alone \\ud83d"}, '
        '{"role": "assistant", "content": "I am here."}]}',
        "invalid_record",
    ),
]


def run_prepare_cli(*args: str) -> subprocess.CompletedProcess:
    assert Path(SOULRAY).exists(), (
        f"{SOULRAY} is absent: install the package into this interpreter's environment "
        "(`make test` does: pip install -e '.[dev]')"
    )
    env = os.environ | {"RAY_ADDRESS": "local"}  # a fresh local Ray, never someone else's
    cmd = [SOULRAY, "prepare", "--config", "jobs/quickstart.yaml", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "mixed.jsonl"
    path.write_text("".join(line + "\n" for line, _ in LINES), encoding="utf-8")
    return path


def overrides(bad: Path, out: Path) -> list[str]:
    inputs = f"data.inputs={json.dumps([str(bad)])}"
    return [inputs, f"data.output_dir={out}", "data.num_workers=1"]  # one actor starts faster


def test_bad_records_are_rejected_and_the_good_ones_prepared(bad_file, tmp_path):
    out = tmp_path / "out"
    proc = run_prepare_cli(*overrides(bad_file, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rejected = {
        "duplicate": 1,
        "empty_conversation": 2,
        "invalid_json": 1,
        "invalid_record": 3,
        "no_assistant_turn": 1,
        "unknown_format": 2,
    }
    assert proc.stdout.startswith(
        f"prepared 2 conversations (10 rejected: {json.dumps(rejected)}), 3 assistant turns"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["conversations"], manifest["records"], manifest["rejected"]) == (
        2,
        len(LINES),
        rejected,
    )
    assert (manifest["turns"], manifest["assistant_turns"]) == (2 + 5, 1 + 2)

    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    expected = [(f"{bad_file}:{n}", reason) for n, (_, reason) in enumerate(LINES, 1) if reason]
    assert sorted((r["location"], r["reason"]) for r in rejects) == sorted(expected)
    for r in rejects:
        line = LINES[int(r["location"].rsplit(":", 1)[1]) - 1][0]
        if r["reason"] != "duplicate":  # a duplicate is written as its cleaned conversation
            assert r["record"] == line
        assert r["detail"]
    details = {r["location"].rsplit(":", 1)[1]: r["detail"] for r in rejects}
    assert details["3"] == "messages[0].content must be a string, got int"
    assert details["4"] == "'messages' must be a list, got str"
    assert details["9"] == f"same messages as {bad_file}:1"
    assert details["12"] == (
        "messages[0].content has an unpaired UTF-16 surrogate '\\ud83d' at character 6 (half "
        "of an emoji or character, cut by a broken export); remove it or restore the whole "
        "character"
    )

    shards = sorted(out.glob("*/part=*/*.parquet"))  # <split>/part=<k>/
    assert shards
    turns = sum(sum(pq.read_table(s).column("assistant_turns").to_pylist()) for s in shards)
    assert turns == 3


def test_strict_stops_naming_file_and_line(bad_file, tmp_path):
    out = tmp_path / "out"
    proc = run_prepare_cli(*overrides(bad_file, out), "--strict")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bad_file}:2: invalid_json: Unterminated string starting at"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing written


def test_strict_also_stops_at_records_only_dedupe_or_rendering_judge(tmp_path):
    """A duplicate (found corpus-wide after parsing) and a system prompt longer than seq_len
    (found when rendering) stop --strict too, and nothing is written."""
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(GOOD_1) + "\n" + json.dumps(GOOD_1 | {"id": "b"}) + "\n")
    out = tmp_path / "out-dup"
    proc = run_prepare_cli(*overrides(dup, out), "--strict")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: 1 duplicate record(s): the same conversation as an earlier record" in (
        proc.stderr
    )
    assert not out.exists()
    long = tmp_path / "long.jsonl"
    system = {"role": "system", "content": " ".join(["Be gentle and patient."] * 200)}
    record = GOOD_2 | {"messages": [system, *GOOD_1["messages"]]}
    long.write_text(json.dumps(GOOD_1) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out-long"
    proc = run_prepare_cli(*overrides(long, out), "data.seq_len=256", "--strict")
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {long}:2: too_long: the system")
    assert not out.exists()
    # into an earlier output: rendering has replaced its splits by then, so none is left that
    # a manifest would vouch for (soulray pipeline would skip prepare on it)
    assert run_prepare_cli(*overrides(long, out), "data.seq_len=256").returncode == 0
    assert (out / "manifest.json").exists()
    proc = run_prepare_cli(*overrides(long, out), "data.seq_len=256", "--strict")
    assert proc.returncode == 1 and "too_long" in proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "train").exists()


def test_an_input_path_that_matches_nothing_is_refused_before_ray_starts(tmp_path):
    """Found before Ray starts: no Ray session directory is made (it took ~40 s to say)."""
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": str(tmp_path)}
    cmd = [SOULRAY, "prepare", "--config", "jobs/quickstart.yaml", "data.inputs=[/nope/*.jsonl]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "error: data.inputs entry '/nope/*.jsonl' matches no .jsonl/.ndjson/.json/.parquet/"
        "withstrategy_short.tsv file; "
        "check the path (relative paths are relative to the directory you run soulray from)"
    )
    assert list(tmp_path.iterdir()) == []  # Ray never started


def test_unknown_config_key_is_refused_by_name():
    proc = run_prepare_cli("data.seq_lne=5")
    assert proc.returncode == 2
    assert "unknown config key 'data.seq_lne'. Did you mean 'data.seq_len'?" in proc.stderr
    assert proc.stdout == ""
