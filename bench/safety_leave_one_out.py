"""Would the crisis classifier generalize better with more authors? Leave one blind set out.

    .venv/bin/python bench/safety_leave_one_out.py [--held 8 7 6 5] [--variants 2] [--out FILE]
    .venv/bin/python bench/safety_leave_one_out.py --hold helper_A helper_B helper_C helper_D \
        --variants 2 1 [--add bench/safety_extra/helper_E.json ...] [--out FILE]

Blind sets 3-8 (now soulray/safety/data/authors/blind3-8.json) were each written by a different
helper who saw neither the code nor the training data. For each held-out set K, two classifiers
are trained exactly as `python -m soulray.safety.train` trains the shipped one (the same variants,
folds, fits and out-of-fold threshold rule): on messages_{en,zh}.json alone (the training data
before stop 22), and on those plus every other blind set (3-8 but K, as hand-written messages
with their variants). Both screen set K (classifier or lexicon, what serving does); the
difference says how much a new author's messages gain from training on other authors' messages.
Run in stop 21, when the training data was messages_{en,zh}.json alone, the training-only row
reproduced the then-shipped weights' counts on every set (a check on this script); stop 22 then
adopted the blind sets and four helpers' sets as training data. Nothing here changes the shipped
weights. Embeddings are cached in --cache between runs. Since stop 34 each screen includes the
training messages' vote (classifier.Neighbours) as the trainer builds it; `--neighbours 0`
measures without it.

`--hold WRITERS` asks the same question the other way round: train on messages_{en,zh}.json and
every writer's set but these, and screen the union of these (stop 22: the four helpers' sets,
written as training data, held out to choose the number of wrapped variants per message).
`--add FILES` trains on these sets too (shaped like data/authors/*.json): run with and without a
candidate batch of training data to see what it gains on the held-out writers (stop 23: the
hard-negative sets in bench/safety_extra/, not adopted). Each result also has a `curve`: recall
at a false-alarm budget and false alarms at a recall target, moving all four thresholds together
in logit space (the lexicon always flags), to tell a better classifier from a moved threshold.
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
from soulray.safety.classifier import Neighbours, with_vote
from soulray.safety.dataset import LANGS, Example

SETS = (3, 4, 5, 6, 7, 8)  # the blind sets that label each crisis message's category


def examples_with(writers: list[str]) -> list[Example]:
    """The training examples of messages_{lang}.json plus `writers`' sets (data/authors/), which
    get variants and folds the same way."""
    return [e for lang in LANGS for e in dataset.build_examples(lang, writers)]


Screen = tuple[list[np.ndarray], np.ndarray, Neighbours | None]


def train_screen(examples: list[Example], embedder: T.Embedder, cache: Path, jobs: int) -> Screen:
    """The weights, the training messages' vote and the out-of-fold thresholds
    `python -m soulray.safety.train` would write."""
    y, t = T.labels(examples), T.targets(examples)
    x = T.featurize([e.text for e in examples], embedder, cache, T.MAX_CHARS, jobs)
    folds = T.fold_of([e.group for e in examples])
    oof, params = T.fit_all(x, t, folds, T.FEATURES, jobs)
    oof, neighbours = T.add_vote(oof, x.embed, y, folds)
    return params, T.choose_thresholds(oof, y), neighbours


def screen_counts(
    screen: Screen, held: dict, embedder: T.Embedder, cache: Path
) -> dict[str, dict[str, int]]:
    """Caught and false alarms on one held-out set, classifier or lexicon (what serving does)."""
    params, thresholds, neighbours = screen
    out = {}
    for lang in LANGS:
        crisis, ordinary = held[f"crisis_{lang}"], held[f"ordinary_{lang}"]
        texts = crisis + ordinary
        hx = T.featurize(texts, embedder, cache, T.MAX_CHARS, 1)
        scores = T.probabilities(T.expand(params, hx), hx)
        if neighbours is not None:
            n = neighbours
            scores = with_vote(scores, n.vote(n.project(hx.embed), n.bank(), n.crisis), n.beta)
        scores = np.clip(scores, 1e-12, 1 - 1e-12)
        lexicon = T.lexicon_flags(texts)
        flagged = (scores >= thresholds).any(1) | lexicon
        margin = (np.log(scores / (1 - scores)) - np.log(thresholds / (1 - thresholds))).max(1)
        out[lang] = {
            "caught": int(flagged[: len(crisis)].sum()),
            "crisis": len(crisis),
            "false_alarms": int(flagged[len(crisis) :].sum()),
            "ordinary": len(ordinary),
            "curve": curve(np.where(lexicon, np.inf, margin), len(crisis)),
        }
    return out


def curve(margin: np.ndarray, n_crisis: int) -> dict[str, float]:
    """Recall at a false-alarm budget and false alarms at a recall target, every threshold moved
    by the same logit shift (margin: a message's highest logit above its category's threshold;
    inf where the lexicon flags)."""
    crisis, ordinary = margin[:n_crisis], margin[n_crisis:]
    cuts = np.unique(np.r_[margin[np.isfinite(margin)], np.inf])
    recall = np.array([(crisis >= c).mean() for c in cuts])
    fpr = np.array([(ordinary >= c).mean() for c in cuts])
    out = {}
    for budget in (0.05, 0.08, 0.10):
        out[f"recall at fpr<={budget:.2f}"] = round(float(recall[fpr <= budget].max(initial=0)), 4)
    for target in (0.80, 0.90, 0.95):
        ok = fpr[recall >= target]
        out[f"fpr at recall>={target:.2f}"] = round(float(ok.min()), 4) if ok.size else 1.0
    return out


def held_writers(names: list[str]) -> dict:
    """The union of some writers' sets (data/authors/), shaped as one set."""
    held: dict = {}
    for name in names:
        for key, value in json.loads(dataset._data(f"authors/{name}.json")).items():
            if isinstance(value, list):
                held.setdefault(key, []).extend(value)
    return held


def print_counts(name: str, counts: dict) -> None:
    line = " ".join(
        f"{lang} caught {c['caught']}/{c['crisis']} "
        f"false alarms {c['false_alarms']}/{c['ordinary']}"
        for lang, c in counts.items()
    )
    print(f"{name}: {line}", flush=True)
    for lang, c in counts.items():
        print(f"  {lang} curve: " + ", ".join(f"{k} {v:.1%}" for k, v in c["curve"].items()))


def main() -> None:
    from _args import non_negative_int, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument(
        "--held",
        type=int,
        nargs="+",
        default=[8, 7, 6, 5],
        choices=SETS,
        metavar="K",
        help="the blind sets (3-8) to hold out, one at a time (default: %(default)s)",
    )
    which.add_argument(
        "--hold",
        nargs="+",
        metavar="WRITER",
        choices=dataset.authors(),
        help="instead: train on every other writer's set, screen these (e.g. helper_A helper_B)",
    )
    ap.add_argument(
        "--add",
        nargs="+",
        default=[],
        type=Path,
        metavar="FILE",
        help="with --hold: also train on these sets (JSON shaped like data/authors/*.json)",
    )
    ap.add_argument(
        "--variants",
        type=non_negative_int,
        nargs="+",
        default=[dataset.VARIANTS],
        help="wrapped variants per message; several: one run each (stop 21's table used 2)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/safety_loo_cache.npz"),
        help="an .npz keeping the embeddings between runs, written if absent (default: "
        "%(default)s)",
    )
    ap.add_argument(
        "--jobs",
        type=positive_int,
        default=2,
        help="parallel processes for embedding and fitting (default: %(default)s)",
    )
    ap.add_argument(
        "--neighbours",
        type=non_negative_int,
        default=T.KNN_K,
        help="training messages that vote on a message's scores (0: no vote)",
    )
    ap.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = ap.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    T.KNN_K = args.neighbours
    if args.add and not args.hold:
        ap.error("--add goes with --hold")
    for path in args.add:
        if not path.is_file() or path.suffix != ".json":
            ap.error(f"--add {path}: not a .json file")
    embedder = T.Embedder()
    report: dict = {}
    for variants in args.variants:
        dataset.VARIANTS = variants
        if args.hold:
            rest = [w for w in dataset.authors() if w not in args.hold]
            rest += [str(path) for path in args.add]
            screen = train_screen(examples_with(rest), embedder, args.cache, args.jobs)
            name = f"{'+'.join(args.hold)} held out, {variants} variant(s)"
            if args.add:
                name += f", trained with {'+'.join(path.stem for path in args.add)}"
            report[name] = screen_counts(screen, held_writers(args.hold), embedder, args.cache)
            print_counts(name, report[name])
            continue
        blinds = {k: json.loads(dataset._data(f"authors/blind{k}.json")) for k in SETS}
        base = train_screen(examples_with([]), embedder, args.cache, args.jobs)  # same for all K
        for k in args.held:
            others = examples_with([f"blind{j}" for j in SETS if j != k])
            grown = train_screen(others, embedder, args.cache, args.jobs)
            key = f"blind{k}" if variants == 2 else f"blind{k}, {variants} variant(s)"
            report[key] = {
                "train only": screen_counts(base, blinds[k], embedder, args.cache),
                "train + other blind sets": screen_counts(grown, blinds[k], embedder, args.cache),
            }
            for name, counts in report[key].items():
                print_counts(f"blind set {k}, {name}", counts)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
