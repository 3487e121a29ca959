"""Two classifier weights files side by side on every regression set: what each catches and
falsely flags, and how many messages change their flag.

    .venv/bin/python bench/safety_weights_diff.py OTHER.npz [--base BASE.npz] [--out REPORT.json]

BASE defaults to the shipped soulray/safety/data/weights.npz. The sets are the SETS of
tests/safety/test_safety_regression.py (tuning, held-out rounds, blind sets 2-16), screened as
the tests screen them (lexicon + classifier, the shipped config), each weights file with its own
thresholds. Every message is embedded once and the vector reused for the second file, so the
difference is the weights' alone. For a weights change that should not change behaviour (a
storage format, a faster fit): 0 changed flags is the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from soulray.config import SafetyConfig
from soulray.safety.classifier import load_weights, weights_path
from soulray.safety.screen import assess, build_screen

ROOT = Path(__file__).resolve().parents[1]


def regression_sets() -> tuple[dict[str, tuple[list[str], list[str]]], dict]:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "safety")]
    import test_safety_regression as regression

    return regression.SETS, regression.MEASURED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", type=Path, help="a weights.npz (train.py --out)")
    ap.add_argument("--base", type=Path, default=weights_path(), help="default: the shipped one")
    ap.add_argument("--out", type=Path, help="write the report here as JSON")
    args = ap.parse_args()
    for path in (args.base, args.other):  # before minutes of screening with the first file
        if not path.is_file():
            ap.error(f"no weights file at {path}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    sets, measured = regression_sets()
    screen = build_screen(SafetyConfig())
    assert screen.classifier is not None
    embedder = screen.classifier.embedder
    assert embedder is not None
    vectors: dict[str, np.ndarray] = {}
    embed_one_by_one = embedder.embed

    def embed(texts: list[str]) -> np.ndarray:  # each text embedded once for both files
        new = [t for t in texts if t not in vectors]
        if new:
            vectors.update(zip(new, embed_one_by_one(new), strict=True))
        return np.stack([vectors[t] for t in texts])

    embedder.embed = embed  # type: ignore[method-assign]
    flags: dict[str, dict[str, list[bool]]] = {}
    for name, path in (("base", args.base), ("other", args.other)):
        w = load_weights(path)
        screen.classifier.w = w
        screen = dataclasses.replace(
            screen, thresholds=w.thresholds.astype(np.float64), cache=OrderedDict()
        )
        flags[name] = {
            k: [assess(screen, [m]).flagged for m in crisis + ordinary]
            for k, (crisis, ordinary) in sets.items()
        }
        print(f"{name}: {path}, thresholds {np.round(w.thresholds, 4).tolist()}", flush=True)
    rows = {}
    for k, (crisis, _) in sets.items():
        base, other = flags["base"][k], flags["other"][k]
        n = len(crisis)
        rows[k] = {
            "caught": [sum(base[:n]), sum(other[:n])],
            "false_alarms": [sum(base[n:]), sum(other[n:])],
            "changed": sum(a != b for a, b in zip(base, other, strict=True)),
            "tests_measured": list(measured[k]),
        }
        print(
            f"{k}: caught {rows[k]['caught']}, false alarms {rows[k]['false_alarms']}, "
            f"changed {rows[k]['changed']}"
        )
    total = sum(r["changed"] for r in rows.values())
    messages = sum(len(c) + len(o) for c, o in sets.values())
    print(f"{total} of {messages} messages changed their flag")
    if args.out:
        report = {
            "base": str(args.base),
            "other": str(args.other),
            "changed": total,
            "messages": messages,
            "sets": rows,
        }
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
