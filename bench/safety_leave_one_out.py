"""Would the crisis classifier generalize better with more authors? Leave one blind set out.

    .venv/bin/python bench/safety_leave_one_out.py [--held 8 7 6 5] [--out FILE]

Blind sets 3-8 (tests/safety/) were each written by a different helper who saw neither the code
nor the training data. For each held-out set K, two classifiers are trained exactly as
`python -m soulray.safety.train` trains the shipped one (the same variants, folds, fits and
out-of-fold threshold rule): on the training data alone, and on the training data plus every
other blind set (3-8 but K, as hand-written messages with their variants). Both screen set K
(classifier or lexicon, what serving does); the difference says how much a new author's
messages gain from training on other authors' messages. The training-only row reproduces the
shipped weights' counts in tests/safety/test_safety_regression.py (a check on this script).
Nothing here changes the shipped weights. Embeddings are cached in --cache between runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

import soulray.safety.dataset as dataset
import soulray.safety.train as T
from soulray.safety.dataset import LANGS, Example

BLIND_DIR = Path(__file__).resolve().parent.parent / "tests" / "safety"
SETS = (3, 4, 5, 6, 7, 8)  # the blind sets that label each crisis message's category


def blind_rows(blind: dict, lang: str) -> list[tuple[str, str, str]]:
    """(text, label, kind) of one blind set's messages, as dataset.written gives them."""
    crisis = blind[f"crisis_{lang}"]
    rows = [(t, c, c) for t, c in zip(crisis, blind[f"crisis_{lang}_category"], strict=True)]
    ordinary = blind[f"ordinary_{lang}"]
    kinds = blind.get(f"ordinary_{lang}_kind") or ["blind"] * len(ordinary)
    return rows + [(t, "none", k) for t, k in zip(ordinary, kinds, strict=True)]


def examples_with(blinds: list[dict]) -> list[Example]:
    """The training examples, with `blinds` added to the hand-written messages (so they get
    variants and folds the same way)."""
    return [
        e
        for lang in LANGS
        for e in dataset.build_examples(lang, [r for b in blinds for r in blind_rows(b, lang)])
    ]


def train_screen(
    examples: list[Example], embedder: T.Embedder, cache: Path, jobs: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The weights and out-of-fold thresholds `python -m soulray.safety.train` would write."""
    y = T.labels(examples)
    x = T.featurize([e.text for e in examples], embedder, cache, T.MAX_CHARS, jobs)
    oof, params = T.fit_all(x, y, T.fold_of([e.group for e in examples]), T.FEATURES, jobs)
    return params, T.choose_thresholds(oof, y)


def screen_counts(
    screen: tuple[list[np.ndarray], np.ndarray], held: dict, embedder: T.Embedder, cache: Path
) -> dict[str, dict[str, int]]:
    """Caught and false alarms on one held-out set, classifier or lexicon (what serving does)."""
    params, thresholds = screen
    out = {}
    for lang in LANGS:
        crisis, ordinary = held[f"crisis_{lang}"], held[f"ordinary_{lang}"]
        texts = crisis + ordinary
        hx = T.featurize(texts, embedder, cache, T.MAX_CHARS, 1)
        scores = T.sigmoid(T.logits(T.expand(params, hx), hx))
        flagged = (scores >= thresholds).any(1) | T.lexicon_flags(texts)
        out[lang] = {
            "caught": int(flagged[: len(crisis)].sum()),
            "crisis": len(crisis),
            "false_alarms": int(flagged[len(crisis) :].sum()),
            "ordinary": len(ordinary),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", type=int, nargs="+", default=[8, 7, 6, 5], choices=SETS)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/safety_loo_cache.npz"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = ap.parse_args()
    blinds = {
        k: json.loads((BLIND_DIR / f"safety_holdout_blind{k}.json").read_text("utf-8"))
        for k in SETS
    }
    embedder = T.Embedder()
    base = train_screen(examples_with([]), embedder, args.cache, args.jobs)  # the same for all K
    report: dict = {}
    for k in args.held:
        others = examples_with([blinds[j] for j in SETS if j != k])
        grown = train_screen(others, embedder, args.cache, args.jobs)
        report[f"blind{k}"] = {
            "train only": screen_counts(base, blinds[k], embedder, args.cache),
            "train + other blind sets": screen_counts(grown, blinds[k], embedder, args.cache),
        }
        for name, counts in report[f"blind{k}"].items():
            line = " ".join(
                f"{lang} caught {c['caught']}/{c['crisis']} false alarms "
                f"{c['false_alarms']}/{c['ordinary']}"
                for lang, c in counts.items()
            )
            print(f"blind set {k}, {name}: {line}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
