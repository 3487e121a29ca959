"""The output directory: dialogue shards that `soulray prepare` reads, bookkeeping it skips.

    <output_dir>/part-00000.jsonl ...     one dialogue a line, OpenAI `messages` + metadata
    <output_dir>/_synth/dropped.jsonl     {"id", "reason", "counts"} of dialogues made, not kept
    <output_dir>/_synth/failed.jsonl      {"id", "reason"} of scenarios a backend failed (and
                                          no later run made)
    <output_dir>/_synth/synth_report.json, *.png, config.yaml

prepare skips names starting with "_", so the directory itself is a valid `data.inputs` entry.
Every line is written and flushed as soon as its dialogue is done, so a killed job loses only
the dialogues in flight (a line cut in half is dropped when the next run opens the shard).
A re-run skips the scenario ids already written or dropped, and retries the failed ones.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from soulray import storage

log = logging.getLogger("soulray.synth")
SHARD_LINES = 1000  # dialogues per shard before a new one is started
META_DIR = "_synth"  # bookkeeping that prepare skips (its name starts with "_")
REPORT_FILE = "synth_report.json"


def report_path(output_dir: str) -> str:
    """Where synth_report.json is, as the messages that point to it spell it."""
    return f"{output_dir}/{META_DIR}/{REPORT_FILE}"


@dataclass
class StoredState:
    records: list[dict[str, Any]] = field(default_factory=list)  # written dialogues
    dropped: dict[str, str] = field(default_factory=dict)  # id -> reason
    # the roleplay's counts (retries, fallbacks, broken rules) summed over the dropped dialogues
    dropped_counts: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  # id -> latest reason, not yet made

    @property
    def finished(self) -> set[str]:
        """Scenario ids a re-run skips."""
        return {r["id"] for r in self.records} | set(self.dropped)


class OutputStore:
    """Appends dialogues, drops and failures to the output directory, line by line."""

    def __init__(self, output_dir: str):
        if storage.is_remote(output_dir):
            raise ValueError(
                f"synth.output_dir={output_dir} is remote; synth appends line by line to a local "
                "(or mounted) directory: write there and copy the finished shards"
            )
        self.root = Path(storage.normalize(output_dir))  # ~ and file:// as everywhere else
        self.meta = self.root / META_DIR
        self._shard: IO[str] | None = None
        self._shard_lines = 0
        self._files: dict[str, IO[str]] = {}

    def load(self) -> StoredState:
        """What earlier runs wrote; a torn last line (a killed run) is cut off first."""
        state = StoredState()
        for path in self.shards():
            state.records += read_lines(path)
        for row in read_lines(self.meta / "dropped.jsonl"):
            state.dropped[row["id"]] = row["reason"]
            state.dropped_counts.update(row.get("counts", {}))
        made = state.finished
        failed = read_lines(self.meta / "failed.jsonl")
        still = [row for row in failed if row["id"] not in made]
        for row in still:
            state.failed[row["id"]] = row["reason"]
        if len(still) < len(failed):  # made by a later run: no longer failed
            rewrite_lines(self.meta / "failed.jsonl", still)
        return state

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("part-*.jsonl"))

    def write_dialogue(self, record: dict[str, Any]) -> None:
        if self._shard is None or self._shard_lines >= SHARD_LINES:
            self._open_shard()
        assert self._shard is not None
        write_line(self._shard, record)
        self._shard_lines += 1

    def write_dropped(self, scenario_id: str, reason: str, counts: dict[str, int]) -> None:
        row = {"id": scenario_id, "reason": reason, "counts": counts}
        write_line(self._meta_file("dropped.jsonl"), row)

    def write_failed(self, scenario_id: str, reason: str) -> None:
        write_line(self._meta_file("failed.jsonl"), {"id": scenario_id, "reason": reason})

    def write_meta(self, name: str, data: bytes) -> Path:
        self.meta.mkdir(parents=True, exist_ok=True)
        path = self.meta / name
        path.write_bytes(data)
        return path

    def close(self) -> None:
        for f in [self._shard, *self._files.values()]:
            if f is not None:
                f.close()
        self._shard, self._files = None, {}

    def _open_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self.root.mkdir(parents=True, exist_ok=True)
        # each run starts its own shard after the highest one (old ones stay untouched; a
        # deleted one leaves a gap, not a name clash)
        index = max((shard_index(p) for p in self.shards()), default=-1) + 1
        self._shard = (self.root / f"part-{index:05d}.jsonl").open("x", encoding="utf-8")
        self._shard_lines = 0

    def _meta_file(self, name: str) -> IO[str]:
        if name not in self._files:
            self.meta.mkdir(parents=True, exist_ok=True)
            self._files[name] = (self.meta / name).open("a", encoding="utf-8")
        return self._files[name]


def shard_index(path: Path) -> int:
    """part-00012.jsonl -> 12 (-1 for a name that is not a number: never reused)."""
    number = path.stem.removeprefix("part-")
    return int(number) if number.isascii() and number.isdigit() else -1


def write_line(f: IO[str], row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file (none if absent); an unfinished last line is truncated away."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: cutting off an unfinished last line (a run was killed)", path)
        with path.open("r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def rewrite_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file whole: written beside it, then renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    temporary.replace(path)
