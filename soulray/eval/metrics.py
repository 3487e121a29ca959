"""Reference metrics of a reply against the counselor's: BLEU-1..4, ROUGE-1/2/L, Distinct-1/2,
length.

Tokens follow SoulChat's protocol: characters for Chinese (sacrebleu's `zh` tokenizer, which also
splits CJK punctuation and word-tokenizes any Latin text in between), words for English
(sacrebleu's `13a`); both lower-cased. BLEU-n is sacrebleu's cumulative sentence BLEU of order n
(geometric mean of the 1..n-gram precisions times the brevity penalty, `exp` smoothing when an
order has no match). ROUGE is computed here on the same tokens: the `rouge-score` package drops
every non-ASCII character, which would score Chinese as empty. BLEU and ROUGE are on 0-100,
Distinct on 0-1, length in tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

from soulray.text import Language

BLEU_ORDERS = (1, 2, 3, 4)
REFERENCE_METRICS = (
    *(f"bleu_{n}" for n in BLEU_ORDERS),
    "rouge_1",
    "rouge_2",
    "rouge_l",
)


@cache
def _tokenizer(lang: Language) -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh() if lang == "zh" else Tokenizer13a()


def tokenize(text: str, lang: Language) -> list[str]:
    """The tokens every metric counts: characters for zh, words for en, lower-cased."""
    return _tokenizer(lang)(text.lower().strip()).split()


@cache
def _bleu(lang: Language, order: int) -> Any:
    from sacrebleu.metrics import BLEU

    tokenizer = "zh" if lang == "zh" else "13a"
    return BLEU(tokenize=tokenizer, lowercase=True, max_ngram_order=order, effective_order=True)


def bleu(hypothesis: str, reference: str, lang: Language, order: int) -> float:
    """Cumulative sentence BLEU-`order` (0-100)."""
    if not hypothesis.strip():
        return 0.0
    return float(_bleu(lang, order).sentence_score(hypothesis, [reference]).score)


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def f1(overlap: float, hyp_total: int, ref_total: int) -> float:
    if overlap == 0 or hyp_total == 0 or ref_total == 0:
        return 0.0
    precision, recall = overlap / hyp_total, overlap / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> float:
    """ROUGE-N F1 (0-100): clipped n-gram overlap over the hypothesis' and reference's counts."""
    h, r = ngrams(hyp, n), ngrams(ref, n)
    overlap = sum((h & r).values())
    return 100 * f1(overlap, sum(h.values()), sum(r.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time and O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F1 (0-100) from the longest common subsequence."""
    return 100 * f1(lcs_length(hyp, ref), len(hyp), len(ref))


def reference_scores(hypothesis: str, reference: str, lang: Language) -> dict[str, float]:
    """Every per-sample reference metric of one reply, plus its length in tokens."""
    hyp, ref = tokenize(hypothesis, lang), tokenize(reference, lang)
    scores = {f"bleu_{n}": bleu(hypothesis, reference, lang, n) for n in BLEU_ORDERS}
    scores |= {"rouge_1": rouge_n(hyp, ref, 1), "rouge_2": rouge_n(hyp, ref, 2)}
    scores |= {"rouge_l": rouge_l(hyp, ref), "length": float(len(hyp))}
    return scores


def distinct(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n over a model's replies: unique n-grams / all n-grams (0 when there are none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = ngrams(tokens, n)
        seen.update(grams)
        total += sum(grams.values())
    return len(seen) / total if total else 0.0
