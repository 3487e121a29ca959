"""`soulray report RUN_DIR`: a training run's metrics.jsonl as PNG curves (loss with val loss,
tokens/s, learning rate) and a short report.md, written to RUN_DIR/report/.

RUN_DIR is the directory holding metrics.jsonl (train.storage_path/train.run_name), or any
directory above it with exactly one run (a pipeline.run_dir).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from soulray import storage
from soulray.eval.charts import save_curve


def find_metrics(run_dir: str) -> str:
    """The run's metrics.jsonl: in `run_dir`, the one below it, or `run_dir` itself."""
    if run_dir.rstrip("/").endswith(".jsonl") and storage.exists(run_dir):
        return run_dir
    direct = storage.join(run_dir, "metrics.jsonl")
    if storage.exists(direct):
        return direct
    if not storage.exists(run_dir):
        raise ValueError(f"{run_dir} does not exist; pass a training run directory")
    found = [p for p in storage.list_files(run_dir) if p.endswith("/metrics.jsonl")]
    if len(found) != 1:
        what = "no metrics.jsonl" if not found else f"{len(found)} runs: {found}"
        raise ValueError(
            f"{run_dir} holds {what}; pass the run directory (train.storage_path/"
            "train.run_name, where training writes metrics.jsonl)"
        )
    return found[0]


def load_metrics(path: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{number} is not JSON ({e.msg}); is it a metrics.jsonl?"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number} has no integer 'step'; is it a metrics.jsonl?")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return sorted(rows, key=lambda r: r["step"])


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    picked = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [float(s) for s, _ in picked], [float(v) for _, v in picked]


def summary_markdown(rows: list[dict[str, Any]], charts: list[str], path: str) -> str:
    last = rows[-1]
    val = [r for r in rows if r.get("val_loss") is not None]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    attempts = sorted({r.get("start_step", 0) for r in rows})
    speed = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    lines = [
        "# Training run",
        "",
        f"- metrics: {path} ({len(rows)} entries)",
        f"- steps: {last['step']}; attempts started at steps {attempts}",
        f"- loss: {rows[0]['loss']:.4f} at step {rows[0]['step']} -> {last['loss']:.4f}",
    ]
    if best is not None:
        lines.append(
            f"- val loss: best {best['val_loss']:.4f} at step {best['step']}, "
            f"last {val[-1]['val_loss']:.4f}"
        )
    if speed:
        lines.append(f"- tokens/s: median {statistics.median(speed):.0f}, last {speed[-1]:.0f}")
    if last.get("mfu") is not None:
        lines.append(f"- MFU (last): {100 * last['mfu']:.1f} %")
    if last.get("lr") is not None:
        lines.append(f"- lr (last): {last['lr']:.3g}")
    return "\n".join([*lines, "", *(f"![{c}]({c})" for c in charts), ""])


def write_training_report(run_dir: str) -> str:
    """Curves and report.md in <run>/report/; returns that directory."""
    path = find_metrics(run_dir)
    rows = load_metrics(path)
    out = storage.join(path.rsplit("/", 1)[0], "report")
    storage.makedirs(out)
    losses = {"train loss": series(rows, "loss")}
    if series(rows, "val_loss")[0]:
        losses["val loss"] = series(rows, "val_loss")
    charts = [save_curve(losses, "loss", out, "loss.png")]
    for key, label in (("tokens_per_s", "tokens/s"), ("lr", "learning rate")):
        if series(rows, key)[0]:
            charts.append(save_curve({label: series(rows, key)}, label, out, f"{key}.png"))
    storage.write_text(storage.join(out, "report.md"), summary_markdown(rows, charts, path))
    return out
