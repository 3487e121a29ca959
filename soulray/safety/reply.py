"""The reply head: does a model's reply give method details (how, how much, where, when, how to
hide it or not be stopped)? A logistic regression on the message classifier's own features of
the reply window (the e5 embedding of its last tokens and its hashed character n-grams), so it
costs no second embedding. Trained by `python -m soulray.safety.train_reply` on replies written
for this project (data/replies.json, with the counselor replies of the sample corpus) and the
message classifier's ordinary training messages; weights in data/reply_weights.npz, thresholds
chosen out of fold: one at 90 % precision, and a lower one (95 % of method replies) used when the
person's messages are flagged. A reply is screened without the person's words, so "Go ahead,
you've thought about it long enough." is as ambiguous to the head as it reads alone; after a
crisis message a miss costs most and a kind reply replaced costs least (the help lines are shown
already). Without the ordinary text, the head replaced 20 % of real English counselor
replies ("Just be yourself."); with it, see bench/RESULTS.md, stops 39-41.

Why a head of its own: the message classifier learned people's messages, and scores a reply
that gives a method low ("Take 40 of your sleeping pills with alcohol": suicide 0.52, under the
0.9 a reply needs); a reply that names suicide kindly sits among crisis messages, so lowering
the reply threshold replaces kind replies. The lexicon's reply_patterns catch the phrasings they
name and little else: on a blind set of replies (stop 39) they replaced 18 % (en) and 15 % (zh)
of the method replies. Measured figures: bench/RESULTS.md, stops 39-41.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from soulray.safety.features import EMBED_DIM, NGRAM_BUCKETS, ngram_scale


@dataclass(frozen=True, slots=True)
class ReplyWeights:
    embed: np.ndarray  # (384,) float32
    ngram: np.ndarray  # (NGRAM_BUCKETS,) float32 (stored as float16)
    bias: float
    threshold: float  # chosen on out-of-fold scores (train_reply.train, train.choose_thresholds)
    # when the person is in crisis: out of fold, the highest that finds RECALL_FLAGGED of each
    # language's method replies (train_reply.recall_threshold); None in older files (the
    # threshold in use without a crisis applies)
    threshold_flagged: float | None


def reply_weights_path() -> Path:
    return Path(str(resources.files("soulray.safety").joinpath("data/reply_weights.npz")))


def load_reply_weights(path: Path | None = None) -> ReplyWeights:
    with np.load(path or reply_weights_path(), allow_pickle=False) as z:
        if z["embed"].shape != (EMBED_DIM,) or z["ngram"].shape != (NGRAM_BUCKETS,):
            raise ValueError(
                f"{path or reply_weights_path()} was trained for other features; retrain with "
                "`python -m soulray.safety.train_reply`"
            )
        return ReplyWeights(
            z["embed"].astype(np.float32),
            z["ngram"].astype(np.float32),
            float(z["bias"]),
            float(z["threshold"]),
            float(z["threshold_flagged"]) if "threshold_flagged" in z.files else None,
        )


def method_score(w: ReplyWeights, embedding: np.ndarray, ids: np.ndarray) -> float:
    """The probability that a reply window gives method details, from its embedding and n-gram
    bucket ids (features.ngram_ids)."""
    grams = w.ngram[ids].sum() * ngram_scale(len(ids)) if len(ids) else 0.0
    z = float(embedding @ w.embed) + float(grams) + w.bias
    return float(1 / (1 + np.exp(-z)))
