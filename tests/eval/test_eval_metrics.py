"""Reference metrics against values computed by hand (the arithmetic is in each comment)."""

from __future__ import annotations

import math

import pytest

from soulray.eval.metrics import (
    distinct,
    lcs_length,
    reference_scores,
    rouge_l,
    rouge_n,
    tokenize,
)
from soulray.eval.stats import bootstrap_ci, paired_difference, summarize

BP_4_OF_5 = math.exp(1 - 5 / 4)  # brevity penalty: hypothesis of 4 tokens, reference of 5


def test_tokens_are_characters_for_chinese_and_words_for_english():
    assert tokenize("我很难过，真的。", "zh") == ["我", "很", "难", "过", "，", "真", "的", "。"]
    assert tokenize("I'm SO tired, really.", "en") == ["i'm", "so", "tired", ",", "really", "."]


def test_english_scores_by_hand():
    # hyp: the cat sat on the mat / ref: the cat is on the mat (6 tokens each, BP = 1)
    # 1-grams 5/6 (the x2, cat, on, mat), 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3 -> exp smoothing 1/(2*3)
    s = reference_scores("The cat sat on the mat", "the cat is on the mat", "en")
    assert s["bleu_1"] == pytest.approx(100 * 5 / 6)
    assert s["bleu_2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))
    assert s["bleu_3"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert s["bleu_4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** (1 / 4))
    assert s["rouge_1"] == pytest.approx(100 * 5 / 6)  # P = R = 5/6
    assert s["rouge_2"] == pytest.approx(100 * 3 / 5)  # P = R = 3/5
    assert s["rouge_l"] == pytest.approx(100 * 5 / 6)  # LCS: the cat on the mat
    assert s["length"] == 6


def test_chinese_scores_by_hand():
    # hyp 我很难过 (4 chars) / ref 我非常难过 (5 chars): BP = exp(1 - 5/4)
    # 1-grams 3/4 (我 难 过), 2-grams 1/3 (难过), 3-grams 0/2 -> 1/(2*2), 4-grams 0/1 -> 1/(4*1)
    s = reference_scores("我很难过", "我非常难过", "zh")
    assert s["bleu_1"] == pytest.approx(100 * BP_4_OF_5 * 3 / 4)
    assert s["bleu_2"] == pytest.approx(100 * BP_4_OF_5 * (3 / 4 * 1 / 3) ** (1 / 2))
    assert s["bleu_3"] == pytest.approx(100 * BP_4_OF_5 * (3 / 4 * 1 / 3 * 1 / 4) ** (1 / 3))
    assert s["bleu_4"] == pytest.approx(100 * BP_4_OF_5 * (3 / 4 / 3 / 4 / 4) ** (1 / 4))
    assert s["rouge_1"] == pytest.approx(100 * 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert s["rouge_2"] == pytest.approx(100 * 2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert s["rouge_l"] == s["rouge_1"]  # LCS 我难过 = the unigram overlap here
    assert s["length"] == 4


def test_identical_and_empty_replies():
    same = reference_scores("谢谢你愿意说出来。", "谢谢你愿意说出来。", "zh")
    assert all(same[k] == pytest.approx(100) for k in same if k != "length")
    empty = reference_scores("", "I hear you.", "en")
    assert {k: v for k, v in empty.items()} == dict.fromkeys(empty, 0.0)


def test_rouge_and_lcs_details():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (bcba)
    # clipped counts: hyp a a a / ref a b -> overlap 1, P 1/3, R 1/2, F 2/5
    assert rouge_n(["a", "a", "a"], ["a", "b"], 1) == pytest.approx(40.0)
    assert rouge_n(["a"], ["a", "b"], 2) == 0.0  # no bigram in the hypothesis
    assert rouge_l(["x", "y"], ["y", "x"]) == pytest.approx(50.0)  # LCS 1: P = R = 1/2


def test_distinct_counts_unique_ngrams_over_all_replies():
    replies = [tokenize("我 很 好", "zh"), tokenize("我很难过", "zh")]
    # chars: 我 很 好 我 很 难 过 -> 5 unique of 7; bigrams: 我很 很好 我很 很难 难过 -> 4 of 5
    assert distinct(replies, 1) == pytest.approx(5 / 7)
    assert distinct(replies, 2) == pytest.approx(4 / 5)
    assert distinct([["hi"], ["hi"]], 1) == pytest.approx(1 / 2)
    assert distinct([[]], 2) == 0.0


def test_bootstrap_ci_and_paired_difference():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_ci([0.0, 1.0] * 50, seed=1)
    # analytic: the mean of 100 fair coin flips has sd sqrt(0.25 / 100) = 0.05, so the 95 %
    # interval is 0.5 -+ 1.96 * 0.05 = (0.402, 0.598); the margin covers the means' 0.01 grid
    # and the percentile's Monte Carlo error over 1,000 resamples (seeds 0-5: within 0.008)
    assert low == pytest.approx(0.402, abs=0.01) and high == pytest.approx(0.598, abs=0.01)
    assert bootstrap_ci([0.0, 1.0] * 50, seed=1) == (low, high)  # seeded: reproducible
    assert summarize([]) == {"n": 0, "mean": None, "ci": [None, None]}
    equal = paired_difference([1.0, 2.0, 0.0], [1.0, 2.0, 0.0])
    assert equal == {"n": 3, "mean": 0.0, "ci": [0.0, 0.0]}
    worse = paired_difference([0.0] * 20, [1.0] * 20)
    assert worse["mean"] == -1.0 and worse["ci"] == [-1.0, -1.0]
