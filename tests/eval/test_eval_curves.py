"""`soulray report RUN_DIR`: a training run's metrics.jsonl as PNG curves and report.md."""

from __future__ import annotations

import json

from eval_checks import check_pngs
from typer.testing import CliRunner

from soulray.cli import app


def metrics_rows() -> list[dict]:
    """Shaped like train/loop.py's entries: a first attempt to step 20, a resume from 20."""
    rows = []
    for step in (10, 20, 30, 40):
        row = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3 * step / 40, "grad_norm": 1.0}
        row |= {"tokens_per_s": 1000.0 + step, "mfu": None, "start_step": 0 if step <= 20 else 20}
        if step in (20, 40):
            row["val_loss"] = {20: 3.5, 40: 3.25}[step]
        rows.append(row)
    return rows


def test_report_writes_curves_and_summary(tmp_path):
    run = tmp_path / "runs" / "x" / "checkpoints" / "x"
    run.mkdir(parents=True)
    # written out of order on purpose: the report sorts by step
    lines = [json.dumps(r) for r in reversed(metrics_rows())]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # a pipeline run_dir above the run finds the single metrics.jsonl below it
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs" / "x")])
    assert result.exit_code == 0, result.output
    out = run / "report"
    check_pngs(out, ["loss.png", "lr.png", "tokens_per_s.png"])
    md = (out / "report.md").read_text()
    assert "- steps: 40; attempts started at steps [0, 20]" in md
    assert "- loss: 4.0000 at step 10 -> 1.0000" in md
    assert "- val loss: best 3.2500 at step 40, last 3.2500" in md
    assert "- tokens/s: median 1025, last 1040" in md  # median of 1010, 1020, 1030, 1040
    assert "- lr (last): 0.001" in md and "MFU" not in md


def test_report_names_the_problem(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "absent")])
    assert result.exit_code == 1 and "does not exist" in result.output
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "2 runs" in result.output
    (tmp_path / "a" / "metrics.jsonl").write_text("")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a")])
    assert result.exit_code == 1 and "has not logged a step yet" in result.output


def test_report_takes_the_metrics_file_and_names_a_bad_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in metrics_rows()))
    result = CliRunner().invoke(app, ["report", str(metrics)])  # the file, not its directory
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "- steps: 40; attempts started at steps [0, 20]" in md
    assert "- val loss: best 3.2500 at step 40, last 3.2500" in md
    check_pngs(tmp_path / "report", ["loss.png", "lr.png", "tokens_per_s.png"])
    for bad, says in (
        ('{"step": 1, "loss"', "is not JSON"),
        ('{"loss": 1.0}', "no integer 'step'"),
    ):
        metrics.write_text(json.dumps(metrics_rows()[0]) + "\n" + bad + "\n")
        result = CliRunner().invoke(app, ["report", str(metrics)])
        assert result.exit_code == 1 and f"error: {metrics}:2 " in result.output
        assert says in result.output and "Traceback" not in result.output
