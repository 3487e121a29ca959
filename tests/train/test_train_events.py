"""TensorBoard event files written beside metrics.jsonl, read back record by record."""

from __future__ import annotations

import struct
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event

from soulray.train.metrics import MetricsLog


def read_events(path: Path) -> list[Event]:
    """Every Event of one file (TFRecord framing: length, its CRC, the bytes, their CRC)."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return out


def read_scalars(logdir: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in every event file, in file then write order."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            out += [(event.step, v.tag, round(v.simple_value, 4)) for v in event.summary.value]
    return out


def test_scalars_are_written_and_a_resume_purges_the_crashed_steps(tmp_path):
    path = str(tmp_path / "run" / "metrics.jsonl")
    log = MetricsLog(path, resume_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 4.0 - step, "lr": 0.001, "mfu": None, "note": "x"})
    assert read_scalars(tmp_path / "run") == [
        (s, tag, v) for s in (1, 2, 3) for tag, v in (("loss", 4.0 - s), ("lr", 0.001))
    ]
    resumed = MetricsLog(path, resume_step=2)  # step 3 is trained again by the new attempt
    resumed.write({"step": 3, "loss": 0.5, "lr": 0.001})
    assert [line.count('"step"') for line in Path(path).read_text().splitlines()] == [1, 1, 1]
    events = read_scalars(tmp_path / "run")
    assert events[-2:] == [(3, "loss", 0.5), (3, "lr", 0.001)]
    files = sorted((tmp_path / "run").glob("events.out.tfevents.*"))
    assert [f.name.rsplit(".", 1)[-1] for f in files] == ["from0", "from2"]
    purge = [e for e in read_events(files[1]) if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in purge] == [(3, 1)]  # START at step 3
