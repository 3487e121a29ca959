"""Near-duplicate dialogues: MinHash over character 5-gram shingles, banded LSH for candidates,
exact Jaccard to decide. Role-play with one prompt set drifts into the same few dialogues; a
corpus of copies teaches one reply, so copies above the threshold are dropped (and counted)."""

from __future__ import annotations

import hashlib
import re

import numpy as np

SHINGLE = 5
SPACES = re.compile(r"\s+")
MERSENNE = np.uint64((1 << 61) - 1)


def shingles(text: str) -> np.ndarray:
    """Sorted unique 60-bit hashes of the character 5-grams of the lower-cased,
    space-collapsed text (an array: 8 bytes a shingle, where a Python set costs ~100)."""
    norm = SPACES.sub(" ", text.lower()).strip()
    grams = {norm[i : i + SHINGLE] for i in range(max(1, len(norm) - SHINGLE + 1))}
    hashes = [
        int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 4
        for g in grams
    ]
    return np.unique(np.array(hashes, dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    both = len(np.intersect1d(a, b, assume_unique=True))
    return both / (len(a) + len(b) - both)


def lsh_shape(threshold: float, hashes: int = 64, max_miss: float = 1e-3) -> tuple[int, int]:
    """Bands x rows of the 64 MinHash values: the fewest candidates (most rows a band) that
    still make a pair at exactly `threshold` a candidate with probability >= 1 - max_miss
    (a pair is missed with (1 - J**rows)**bands). 0.8 (the default) gives 16 x 4, missing
    0.02 % of pairs at J = 0.8; 0.5 gives 32 x 2, missing 0.01 % (16 x 4 would miss 36 %)."""
    for rows in (8, 4, 2, 1):
        bands = hashes // rows
        if (1 - threshold**rows) ** bands <= max_miss:
            return bands, rows
    return hashes, 1


class NearDuplicateIndex:
    """Keeps what it was given; `find` names an earlier key at least `threshold` similar."""

    def __init__(
        self, threshold: float, bands: int | None = None, rows: int | None = None, seed: int = 0
    ):
        if bands is None or rows is None:
            bands, rows = lsh_shape(threshold)
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.threshold = threshold
        self.bands, self.rows = bands, rows
        self._a = rng.integers(1, int(MERSENNE), n, dtype=np.uint64)
        self._b = rng.integers(0, int(MERSENNE), n, dtype=np.uint64)
        self._buckets: list[dict[bytes, list[str]]] = [{} for _ in range(bands)]
        self._sets: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def signature(self, items: np.ndarray) -> np.ndarray:
        # (a*x + b) wraps mod 2^64, then mod a Mersenne prime: a cheap universal hash family.
        return ((np.outer(self._a, items) + self._b[:, None]) % MERSENNE).min(axis=1)

    def find(self, text: str) -> tuple[str | None, np.ndarray, np.ndarray]:
        """The key of a near-duplicate already kept (or None), plus the text's shingles and
        signature to pass to `add`."""
        items = shingles(text)
        sig = self.signature(items)
        for band, bucket in enumerate(self._buckets):
            for key in bucket.get(self._band_key(sig, band), ()):
                if jaccard(items, self._sets[key]) >= self.threshold:
                    return key, items, sig
        return None, items, sig

    def add(self, key: str, items: np.ndarray, sig: np.ndarray) -> None:
        self._sets[key] = items
        for band, bucket in enumerate(self._buckets):
            bucket.setdefault(self._band_key(sig, band), []).append(key)

    def add_if_new(self, key: str, text: str) -> str | None:
        """Add `text` unless it nearly duplicates a kept one; return that one's key if so."""
        found, items, sig = self.find(text)
        if found is None:
            self.add(key, items, sig)
        return found

    def _band_key(self, sig: np.ndarray, band: int) -> bytes:
        return sig[band * self.rows : (band + 1) * self.rows].tobytes()
