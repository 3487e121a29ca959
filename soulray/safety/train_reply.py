"""Deterministic training of the reply head (reply.py): `python -m soulray.safety.train_reply`.
Reads data/replies.json (model replies written for this project, labelled `method` when they give
method details and `safe` otherwise, and the counselor replies of the sample corpus) and the
message classifier's ordinary training messages (as safe: everyday text of every length), featurizes
them as the message classifier does (train.featurize: the e5 embedding of a window's last tokens
and its character n-grams), fits a class-balanced logistic regression with full-batch Adam from
zeros for a fixed number of steps, and picks the threshold on out-of-fold scores (5 seeded folds)
as the lowest score at which the out-of-fold flags are method replies train.TARGET_PRECISION of
the time (train.choose_thresholds), and a second, lower one for replies to a person in crisis: the
highest out-of-fold score that still finds RECALL_FLAGGED of each language's method replies
(recall_threshold). Writes data/reply_weights.npz (the n-gram block as float16, as the message
weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as train.py: weights independent of cores

import numpy as np

from soulray.safety.dataset import LANGS, Example, fingerprint, load_examples
from soulray.safety.features import EMBED_DIM, NGRAM_BUCKETS, Embedder
from soulray.safety.reply import reply_weights_path
from soulray.safety.train import (
    EMBED_TOKENS,
    FOLDS,
    L2,
    LR,
    STEPS,
    Matrix,
    Scratch,
    _ngram_sums,
    adam_step,
    choose_thresholds,
    digest,
    featurize,
    fold_of,
    progress,
)

RECALL_FLAGGED = 0.95  # of method replies, out of fold: the threshold_flagged rule


def load_replies() -> list[dict[str, str]]:
    text = resources.files("soulray.safety").joinpath("data/replies.json").read_text("utf-8")
    return json.loads(text)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def fit(
    x: Matrix, y: np.ndarray, share: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(embedding weights, n-gram weights over all buckets, bias): each row's share of the loss
    (default: method and safe rows each half), L2 on the weights, zero init, STEPS steps of Adam
    (deterministic)."""
    u = len(x.used)
    if share is None:
        pos = max(1, int(y.sum()))
        share = np.where(y, 0.5 / pos, 0.5 / max(1, len(y) - pos))
    row = (share / share.sum()).astype(np.float32)
    order = np.argsort(x.cols, kind="stable")  # entries by column, for the n-gram gradient
    absent = np.bincount(x.cols, minlength=u) == 0
    col_starts = np.minimum(np.searchsorted(x.cols[order], np.arange(u)), len(order) - 1)
    rows_by_col, vals_by_col = x.rows[order], x.vals[order]
    params = [np.zeros(EMBED_DIM, np.float32), np.zeros(u, np.float32), np.zeros(1, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    scratch = Scratch.of(x, 1)
    target = y.astype(np.float32)
    for step in range(1, STEPS + 1):
        z = x.embed @ params[0] + _ngram_sums(x, params[1][:, None], scratch)[:, 0] + params[2]
        g = ((sigmoid(z) - target) * row).astype(np.float32)
        by_col = np.add.reduceat(g[rows_by_col] * vals_by_col, col_starts)
        grads = [x.embed.T @ g, np.where(absent, np.float32(0), by_col), np.array([g.sum()])]
        adam_step(params, grads, m, v, step, [LR] * 3, [L2, L2, 0.0])
    full = np.zeros(NGRAM_BUCKETS, np.float32)
    full[x.used] = params[1]
    return params[0], full, float(params[2][0])


def scores(head: tuple[np.ndarray, np.ndarray, float], x: Matrix) -> np.ndarray:
    embed, ngram, bias = head
    grams = _ngram_sums(x, ngram[x.used][:, None])[:, 0]
    return sigmoid((x.embed @ embed + grams + bias).astype(np.float64))


def recall_threshold(oof: np.ndarray, y: np.ndarray, langs: np.ndarray) -> float:
    """The highest threshold at which the out-of-fold scores find RECALL_FLAGGED of each
    language's method replies (the lower of the two languages'): the head's threshold when the
    person is in crisis (screen.reply_window_scores), the issue's recall goal."""
    out = []
    for lang in sorted(set(langs[y])):
        s = np.sort(oof[y & (langs == lang)])[::-1]
        out.append(float(s[int(np.ceil(RECALL_FLAGGED * len(s))) - 1]))
    return min(out)


def ordinary_messages() -> list[Example]:
    """The message classifier's ordinary training messages (label none): everyday talk of every
    length. Without them the head, having seen only replies about means, replaced 20 % of real
    English counselor replies ("Just be yourself.", "Yes, i'm here"; bench/RESULTS.md, stop 39)."""
    return [e for lang in LANGS for e in load_examples(lang) if e.label == "none"]


def train(out: Path, jobs: int = 1, cache: Path | None = None) -> None:
    replies, ordinary = load_replies(), ordinary_messages()
    texts = [r["text"] for r in replies] + [e.text for e in ordinary]
    y = np.array([r["label"] == "method" for r in replies] + [False] * len(ordinary))
    langs = np.array([r["lang"] for r in replies] + [e.lang for e in ordinary])
    # the loss: method replies half, kind replies a quarter, ordinary messages a quarter
    n, method = len(replies), y[: len(replies)]
    share = np.full(len(texts), 0.25 / max(1, len(ordinary)))
    share[:n] = np.where(method, 0.5 / max(1, int(method.sum())), 0.25 / max(1, n - method.sum()))
    progress(
        f"{len(replies):,} replies, {int(y.sum()):,} giving method details; "
        f"{len(ordinary):,} ordinary messages"
    )
    x = featurize(texts, Embedder(), cache, jobs=jobs)
    # a hand-written message and its variants share a fold
    groups = [hashlib.sha256(r["text"].encode("utf-8")).hexdigest() for r in replies]
    folds = fold_of(groups + [f"message:{e.lang}:{e.group}" for e in ordinary])
    oof = np.zeros(len(texts))
    for k in range(FOLDS):
        held = folds == k
        oof[held] = scores(fit(x.take(~held), y[~held], share[~held]), x.take(held))
    # the message classifier's rule, for one category: the lowest out-of-fold score whose flags
    # are method replies TARGET_PRECISION of the time
    threshold = float(choose_thresholds(oof[:, None], y[:, None])[0])
    flagged = min(threshold, recall_threshold(oof, y, langs))
    is_reply = np.arange(len(texts)) < len(replies)
    for name, t in (("", threshold), ("; the person in crisis", flagged)):
        for lang in sorted(set(langs)):
            mine = langs == lang
            caught = (oof[mine & y] >= t).mean()
            alarms = (oof[mine & ~y & is_reply] >= t).mean()
            plain = (oof[mine & ~is_reply] >= t).mean()
            progress(
                f"out of fold{name}, {lang}: {caught:.1%} of method replies at {alarms:.1%} of "
                f"kind replies and {plain:.2%} of ordinary messages (threshold {t:.3f})"
            )
    embed, ngram, bias = fit(x, y, share)
    data = hashlib.sha256(
        (json.dumps(replies, ensure_ascii=False) + fingerprint(ordinary)).encode("utf-8")
    ).hexdigest()
    np.savez_compressed(
        out,
        embed=embed,
        ngram=ngram.astype(np.float16),
        bias=np.array(bias, np.float32),
        threshold=np.array(threshold, np.float32),
        threshold_flagged=np.array(flagged, np.float32),
        embed_tokens=np.array(EMBED_TOKENS),
        data_sha256=np.array(data),
    )
    progress(f"threshold {threshold:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=reply_weights_path(),
        help="where to write the weights; the default REPLACES the shipped ones "
        "(default: %(default)s)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="processes for the embeddings")
    ap.add_argument("--cache", type=Path, help="an .npz to keep the embeddings in between runs")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs: 1 or more")
    train(args.out, args.jobs, args.cache)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest(args.out)[:16]})")


if __name__ == "__main__":
    main()
