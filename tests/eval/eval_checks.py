"""Checks every end-to-end eval test makes on the files a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from soulray.eval.markdown import with_ci


def check_md_matches_json(report: dict[str, Any], md: str) -> None:
    """Each turn-mode table row of report.md holds exactly report.json's figures."""
    for model, v in report["summary"]["turn"].items():
        cells = [str(v["replies"]), str(v["failed"]), *(with_ci(s) for s in v["metrics"].values())]
        assert f"| {model} | {' | '.join(cells)} |" in md, model
        j = v["judge"]
        if j is not None:
            judged = [str(j["scored"]), str(j["unscored"])]
            judged += [with_ci(s) for s in j["scores"].values()]
            assert f"| {model} | {' | '.join(judged)} |" in md, model
    for p in report["summary"]["pairwise"]:
        cells = [f"{p['model_1']} vs {p['model_2']}", str(p["compared"]), str(p["unscored"])]
        assert "| " + " | ".join(cells) + " |" in md


def check_pngs(out: Path, expected: list[str]) -> None:
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    for name in expected:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
