"""Crisis screen on a blind set: recall and false-positive rate per language and per category.

    .venv/bin/python bench/safety_eval.py --blind FILE [--lexicon-only] [--lexicon LEXICON.json]
        [--weights WEIGHTS.npz] [--head-window N] [--dilute K [--count N] [--seed S]]
        [--show-misses] [--out REPORT.json]

FILE is JSON shaped {"en": {"crisis": [{"text", "category"}], "ordinary": [{"text", "kind"}]},
"zh": {...}}, or as the sets in tests/safety/ are ({"crisis_en": [...], "crisis_en_category":
[...], "ordinary_en": [...], "ordinary_en_kind": [...], "crisis_zh": ...}; the labels are
optional: blind sets 1-2 have none, 3-4 no ordinary kinds, and unlabelled messages are counted
under "?"). Each message is
screened alone with the shipped config (lexicon + classifier). Recall counts a crisis message as
caught when it is flagged at all (any category: what matters is that the person gets help lines);
the category table also shows how often the flagged category was the labelled one. A blind set is
measured once; its messages must not be read to tune the screen. --lexicon screens with another
lexicon file (shaped like soulray/safety/data/lexicon.json, e.g. `git show
OLD:soulray/safety/data/lexicon.json`): a lexicon change measured side by side with the same
weights; --weights screens with another weights file (e.g. `git show
OLD:soulray/safety/data/weights.npz > old.npz`): a retrain measured side by side. --show-misses
prints the missed and false-alarm messages (for a set that is not blind). --dilute K screens
longer messages made from the set (a crisis message said first and K ordinary ones after it, and
K + 1 ordinary ones together: the small talk a crisis is said among) and --head-window N
embeds a long message's first N tokens (serve.safety.head_window; 0: not): the two side by side
measure what reading the start costs and buys.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from soulray.config import SafetyConfig
from soulray.safety.classifier import Classifier, load_weights
from soulray.safety.screen import assess, build_screen, category_thresholds


def load(path: Path) -> dict:
    data = json.loads(path.read_text("utf-8"))
    if "crisis_en" in data or "crisis_zh" in data:  # the tests' shape
        data = {
            lang: {
                "crisis": _labelled(data, f"crisis_{lang}", "category"),
                "ordinary": _labelled(data, f"ordinary_{lang}", "kind"),
            }
            for lang in ("en", "zh")
            if f"crisis_{lang}" in data
        }
    for lang, sets in data.items():
        if not {"crisis", "ordinary"} <= set(sets):
            raise ValueError(f"{path}: {lang!r} needs 'crisis' and 'ordinary' lists")
    return data


def _labelled(data: dict, key: str, label: str) -> list[dict]:
    """The messages under `key` with their labels from `key_label`, when the set has them (the
    older blind sets have no categories or kinds)."""
    texts = data.get(key, [])
    labels = data.get(f"{key}_{label}")
    if labels is None:
        return [{"text": t} for t in texts]
    return [{"text": t, label: x} for t, x in zip(texts, labels, strict=True)]


def _joined(items: list[dict], lang: str) -> str:
    """Messages as one, each ending a sentence."""
    stop = "。" if lang == "zh" else "."
    parts = [i["text"].strip() for i in items]
    sentences = [p if p[-1:] in ".!?。！？…" else p + stop for p in parts]
    return ("" if lang == "zh" else " ").join(sentences)


def diluted(data: dict, after: int, count: int, seed: int) -> dict:
    """Messages made longer the way people write them: `count` crisis messages per language each
    followed by `after` of the set's ordinary ones (the crisis said first, then small talk), and
    `count` runs of after + 1 ordinary ones; drawn with `seed`. A crisis message keeps its
    category, a run of ordinary ones its first one's kind."""
    rng = random.Random(seed)
    out = {}
    for lang, sets in data.items():
        crisis, ordinary = sets["crisis"], sets["ordinary"]
        picked = rng.sample(crisis, min(count, len(crisis)))
        runs = [rng.sample(ordinary, after + 1) for _ in range(count)]
        out[lang] = {
            "crisis": [
                {**c, "text": _joined([c, *rng.sample(ordinary, after)], lang)} for c in picked
            ],
            "ordinary": [{**run[0], "text": _joined(run, lang)} for run in runs],
        }
    return out


def evaluate(
    data: dict,
    lexicon_only: bool,
    show_misses: bool,
    lexicon: Path | None = None,
    weights: Path | None = None,
    head_window: int = 24,
) -> dict:
    lists = {}
    if lexicon is not None:
        lex = json.loads(lexicon.read_text("utf-8"))
        lists = {k: lex.get(k, {}) for k in ("intent", "lexicon", "patterns")}
        lists |= {"exclude": lex["exclude"], "guard": lex.get("guard", [])}
    cfg = SafetyConfig(classifier=not lexicon_only, head_window=head_window, **lists)
    screen = build_screen(cfg)
    if weights is not None and screen.classifier is not None:
        screen.classifier = Classifier(load_weights(weights))
        screen.thresholds = category_thresholds(cfg, screen.classifier)
    report: dict = {}
    for lang, sets in data.items():
        by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, caught, same category
        for item in sets["crisis"]:
            a = assess(screen, [item["text"]])
            row = by_cat[item.get("category", "?")]
            row[0] += 1
            row[1] += a.flagged
            row[2] += item.get("category") in a.categories
            if show_misses and not a.flagged:
                print(f"  miss [{lang} {item.get('category')}] {item['text']}")
        alarms = defaultdict(lambda: [0, 0])
        for item in sets["ordinary"]:
            a = assess(screen, [item["text"]])
            alarms[item.get("kind", "?")][0] += 1
            alarms[item.get("kind", "?")][1] += a.flagged
            if show_misses and a.flagged:
                print(f"  false alarm [{lang} {item.get('kind')} -> {a.category}] {item['text']}")
        n, caught = sum(r[0] for r in by_cat.values()), sum(r[1] for r in by_cat.values())
        m, fa = sum(r[0] for r in alarms.values()), sum(r[1] for r in alarms.values())
        report[lang] = {
            "recall": caught / max(n, 1),
            "fpr": fa / max(m, 1),
            "crisis": n,
            "ordinary": m,
            "categories": {
                c: {
                    "n": r[0],
                    "recall": r[1] / r[0],
                    "same_category": None if c == "?" else r[2] / r[0],  # no label to match
                }
                for c, r in sorted(by_cat.items())
            },
            "ordinary_kinds": {
                k: {"n": r[0], "fpr": r[1] / r[0]} for k, r in sorted(alarms.items())
            },
        }
    return report


def main() -> None:
    from _args import existing_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blind", type=existing_file, required=True, help="the blind set JSON")
    ap.add_argument(
        "--lexicon-only", action="store_true", help="the lexicon without the classifier"
    )
    ap.add_argument(
        "--lexicon", type=existing_file, help="a lexicon.json to use instead of the built-in"
    )
    ap.add_argument(
        "--weights", type=existing_file, help="a weights.npz to use instead of the shipped"
    )
    ap.add_argument(
        "--head-window",
        type=int,
        default=SafetyConfig().head_window,
        metavar="N",
        help="a long message's first N tokens embedded too (serve.safety.head_window; 0: its "
        "end alone; default %(default)s)",
    )
    ap.add_argument(
        "--dilute",
        type=int,
        metavar="K",
        help="screen longer messages made from the set instead: each crisis message followed by K "
        "ordinary ones, and runs of K + 1 ordinary ones (see --count, --seed)",
    )
    ap.add_argument(
        "--count", type=int, default=100, help="--dilute's messages per kind and language"
    )
    ap.add_argument("--seed", type=int, default=7, help="--dilute's draw")
    ap.add_argument("--show-misses", action="store_true", help="print misses and false alarms")
    ap.add_argument("--out", type=Path, help="also write the report as JSON")
    args = ap.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    if args.weights and args.lexicon_only:
        ap.error("--weights and --lexicon-only: the lexicon alone uses no weights")
    data = load(args.blind)
    if args.dilute:
        data = diluted(data, args.dilute, args.count, args.seed)
    report = evaluate(
        data,
        args.lexicon_only,
        args.show_misses,
        args.lexicon,
        args.weights,
        head_window=args.head_window,
    )
    for lang, r in report.items():
        print(
            f"{lang}: recall {r['recall']:.1%} ({r['crisis']} crisis)  "
            f"FPR {r['fpr']:.1%} ({r['ordinary']} ordinary)"
        )
        for c, row in r["categories"].items():
            same = row["same_category"]
            labelled = "" if same is None else f" labelled category flagged {same:.1%}"
            print(f"  {c:10s} n={row['n']:3d} recall {row['recall']:.1%}{labelled}")
        for k, row in r["ordinary_kinds"].items():
            print(f"  ordinary/{k:10s} n={row['n']:3d} FPR {row['fpr']:.1%}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2), "utf-8")


if __name__ == "__main__":
    main()
