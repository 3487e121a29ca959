"""The training data, the shipped weights, retraining, and a fresh install carrying them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from soulray_testing import retrain_in_background

from soulray.safety import train
from soulray.safety.classifier import (
    CATEGORIES,
    ORDINARY,
    Classifier,
    Neighbours,
    load_weights,
    weights_path,
    with_vote,
)
from soulray.safety.dataset import (
    LANGS,
    LONG_MAX_CHARS,
    Example,
    fingerprint,
    load_examples,
    written,
)
from soulray.safety.features import Embedder, normalize
from soulray.safety.lexicon import classifier_text
from soulray.safety.train import _embeddings

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("lang", LANGS)
def test_the_training_set_covers_the_brief(lang):
    rows = load_examples(lang)
    hand = written(lang)
    assert len(hand) >= 2000 and len(rows) >= 7000
    labels = Counter(label for _, label, _ in hand)
    kinds = Counter(kind for _, label, kind in hand if label == "none")
    assert all(labels[c] >= 170 for c in CATEGORIES) and labels["suicide"] >= 460
    assert labels["none"] >= 950  # hard negatives, about 5 for every 6 crisis messages
    assert {"idiom", "grief", "friend", "media", "medication", "sadness", "breakup", "exam"} <= set(
        kinds
    ) and {"anger", "fitness", "truecrime", "everyday", "counselor"} <= set(kinds)
    assert len({e.text for e in rows}) == len(rows)  # no duplicate messages
    assert len({t.lower() for t, _, _ in hand}) == len(hand)  # none written twice


def test_the_shipped_weights_were_fit_on_the_training_set_built_now():
    """train.py records the sha256 of the set it fit on. Editing a message, an author file or
    the wrappers without retraining fails here, in a second; the slow test below retrains."""
    with np.load(weights_path()) as w:
        shipped = str(w["data_sha256"])
    assert shipped == fingerprint([e for lang in LANGS for e in load_examples(lang)])


@pytest.mark.parametrize("lang", LANGS)
def test_long_variants_hold_their_message_among_ordinary_talk_for_every_label(lang):
    """Some messages also appear among 2-3 filler sentences (the same pool for every label),
    whole and within LONG_MAX_CHARS, sharing the group (fold) of the message they carry."""
    hand = {f"{lang}-{i}": (t, label) for i, (t, label, _) in enumerate(written(lang))}
    fillers = json.loads((ROOT / "soulray/safety/data/wrappers.json").read_text("utf-8"))[lang]
    fillers = fillers["fillers"]
    long_rows = [e for e in load_examples(lang) if any(f in e.text for f in fillers)]
    assert 0.4 * len(hand) < len(long_rows) < 0.6 * len(hand)
    for e in long_rows:
        text, label = hand[e.group]
        assert text in e.text and e.label == label
        assert sum(f in e.text for f in fillers) >= 1
        assert len(e.text) <= max(LONG_MAX_CHARS, len(text) + max(map(len, fillers)) + 2)
    by_label = Counter(e.label for e in long_rows)
    assert all(by_label[c] >= 60 for c in (*CATEGORIES, "none"))


def test_the_embedding_cache_reuses_known_texts_and_embeds_only_new_ones(tmp_path):
    """train.py --cache keeps vectors per text: adding messages embeds only the new ones, and a
    cached vector is the one a fresh embedding gives (one text at a time, deterministic)."""
    cache, embedder = tmp_path / "cache.npz", Embedder()
    first = _embeddings(["i want to die", "累死了"], embedder, cache)
    with np.load(cache) as z:
        assert sorted(z["texts"].tolist()) == ["i want to die", "累死了"]

    class Counting:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def embed(self, texts: list[str]) -> np.ndarray:
            self.seen += texts
            return embedder.embed(texts)

    counting = Counting()
    again = _embeddings(["累死了", "我想死", "i want to die"], counting, cache)  # type: ignore[arg-type]
    assert counting.seen == ["我想死"]
    np.testing.assert_array_equal(again[[2, 0]], first)
    np.testing.assert_array_equal(again[1], embedder.embed(["我想死"])[0])


def test_the_embedding_reads_the_longest_tail_that_fits_starting_at_a_word():
    """Embedder.tail: what the embedding of a long message reads (train.EMBED_TOKENS tokens, so a
    message's embedding costs at most ~50 ms on one thread). The n-grams and the lexicon still
    read the whole last max_chars characters."""
    embedder = Embedder()
    count = embedder.model.token_count
    assert embedder.tail("i want to die", 48) == "i want to die"
    filler = "we talked about the weather and the garden for a long time. " * 5
    text = filler + "tonight i'm going to end my life"
    cut = embedder.tail(text, 48)
    start = len(text) - len(cut)
    assert text.endswith(cut) and 40 <= count(cut, True) <= 48
    assert text[start - 1] == " "  # starts at a word
    previous = text[: start - 1].rsplit(" ", 1)[-1]
    assert count(f"{previous} {cut}", True) > 48  # one word more does not fit
    zh = "这段时间我总是反反复复地想工作上和家里发生的那些事情。" * 5 + "我今晚就想结束自己的生命"
    cut = embedder.tail(zh, 48)
    assert zh.endswith(cut) and count(cut, True) <= 48 < count(zh[-len(cut) - 1 :], True)
    assert embedder.tail(text, 0) == text  # 0: no cap (weights trained before the cap)


def test_serving_embeds_the_tail_the_weights_were_trained_on():
    classifier = Classifier(load_weights())
    assert classifier.w.embed_tokens == train.EMBED_TOKENS == 48
    embedder = classifier.embedder
    assert embedder is not None
    read: list[str] = []
    embed = embedder.embed
    embedder.embed = lambda texts: (read.extend(texts), embed(texts))[1]  # type: ignore[method-assign]
    text = "we talked about the weather and the garden for a long time. " * 5 + "i want to die"
    classifier.scores(text)
    classifier.scores("i want to die")
    assert read == [embedder.tail(text, 48), "i want to die"] and len(read[0]) < len(text) - 100


def test_the_shipped_weights_are_small_and_carry_out_of_fold_thresholds():
    w = load_weights()
    assert weights_path().stat().st_size < 4 * 2**20  # ships in the wheel
    n = w.neighbours  # every training message, 128 int8 directions each, votes
    assert n is not None and (n.k, n.beta, n.tau) == (train.KNN_K, train.KNN_BETA, train.KNN_TAU)
    rows = [e for lang in LANGS for e in load_examples(lang)]
    assert n.codes.shape == (len(rows), 128) and n.codes.dtype == np.int8
    assert n.crisis.tolist() == [e.label != "none" for e in rows]
    assert w.features == "both" and w.classes == CATEGORIES + ORDINARY
    assert w.embed.shape == (384, 13) and w.ngram.shape[1] == 5 and w.bias.shape == (13,)
    assert np.all((w.thresholds >= 0.05) & (w.thresholds <= 0.95))
    # the linear model: the hidden layer and sentence pieces were measured, not adopted
    assert w.hidden_w.shape == (384, 0) and w.pieces == 0


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_weights():
    """Same data, same seed -> the same weights (the classifier's, then the reply head's): bit
    for bit on one machine (the trainer runs BLAS on one thread, so the core count does not
    change a sum's order), compared to 1e-5 and the float16 n-gram block to one rounding step,
    but for a few rarely-seen n-gram weights (assert_same_weights): another CPU family's BLAS
    kernels round sums differently, and Adam carries that into them. The retrain
    (`python -m soulray.safety.train --jobs 2`: the same numbers as one process, half the wall
    time on two cores) starts in the background when the session's tests are collected
    (tests/conftest.py); this test runs last and waits for it."""
    run, out = retrain_in_background()
    code = run.wait(timeout=3600)
    log = (out.parent / "retrain.log").read_text()
    assert code == 0, log
    shipped, again = np.load(weights_path()), np.load(out)
    assert_same_weights(again, shipped, ("embed", "bias", "thresholds"))
    keys = ("features", "data_sha256", "pieces", "embed_tokens", "knn_k", "knn_beta", "knn_tau")
    for key in keys:
        assert str(again[key]) == str(shipped[key]), key
    # The bank's directions are eigenvectors, each signed by its largest entry: another CPU's
    # rounding could flip one whose two largest entries nearly tie (cosines, and so the votes,
    # do not change). Compared up to each direction's sign.
    sign = np.sign((again["knn_basis"] * shipped["knn_basis"]).sum(axis=0))
    np.testing.assert_allclose(again["knn_mean"], shipped["knn_mean"], atol=1e-5)
    np.testing.assert_allclose(again["knn_basis"] * sign, shipped["knn_basis"], atol=1e-5)
    np.testing.assert_allclose(again["knn_scale"], shipped["knn_scale"], atol=1e-5)
    # int8 codes: a projection 1e-6 from a rounding boundary may land one step apart
    codes = again["knn_codes"].astype(int) * sign.astype(int) - shipped["knn_codes"]
    assert np.abs(codes).max() <= 1 and np.count_nonzero(codes) <= 100
    assert (again["knn_crisis"] == shipped["knn_crisis"]).all()
    # the reply head, trained after it in the same process (reply.py)
    from soulray.safety.reply import reply_weights_path

    shipped, again = np.load(reply_weights_path()), np.load(out.parent / "reply_weights.npz")
    assert_same_weights(again, shipped, ("embed", "bias", "threshold", "threshold_flagged"))
    assert str(again["data_sha256"]) == str(shipped["data_sha256"])


def assert_same_weights(again: Any, shipped: Any, dense: tuple[str, ...]) -> None:
    """The dense arrays to 1e-5; the float16 n-gram block to one rounding step (a weight 1e-5
    from a rounding boundary may round one step, 2**-10, apart), but for at most NGRAM_DRIFT
    weights, none moved by more than 0.02: rarely-seen n-grams, where another CPU's rounding of
    a sum, carried by Adam, moves the weight (2 against 1 BLAS thread: 17 of 655,360, one
    changing sign, 0 of the 8,778 regression-set flags changed, bench/RESULTS.md, stop 28; an
    AMD EPYC against the machine that trained the shipped weights: 28, the largest 0.0076,
    stop 41). Other data, another seed or another fit moves most of them."""
    for key in dense:
        np.testing.assert_allclose(again[key], shipped[key], atol=1e-5, err_msg=key)
    assert again["ngram"].dtype == shipped["ngram"].dtype == np.float16
    a, b = again["ngram"].astype(np.float32), shipped["ngram"].astype(np.float32)
    beyond = np.abs(a - b) > 1e-5 + 2**-10 * np.abs(b)
    moved = int(beyond.sum())
    assert moved <= NGRAM_DRIFT, f"{moved} n-gram weights beyond one step (at most {NGRAM_DRIFT})"
    most = float(np.abs(a - b).max())
    assert most <= 0.02, f"an n-gram weight moved by {most:.4f} (at most 0.02)"


NGRAM_DRIFT = 100  # of the n-gram weights (655,360 for the classifier), beyond one float16 step


@pytest.mark.slow
def test_a_fresh_install_loads_the_shipped_weights(tmp_path):
    """Build the wheel, install it apart from this checkout, load weights and data from it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("soulray-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    probe = (
        "import json, soulray.safety.classifier as c, soulray.safety.dataset as d;"
        "import soulray.safety.reply as r, soulray.safety.train_reply as t;"
        "w = c.load_weights(); print(json.dumps([str(c.weights_path()), w.thresholds.tolist(),"
        " len(d.load_examples('zh')), r.load_reply_weights().threshold, len(t.load_replies())]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    path, thresholds, n, reply_threshold, replies = json.loads(out.stdout)
    assert path.startswith(str(target)) and n == len(load_examples("zh"))
    assert thresholds == load_weights().thresholds.tolist()
    from soulray.safety.reply import load_reply_weights
    from soulray.safety.train_reply import load_replies

    assert (reply_threshold, replies) == (load_reply_weights().threshold, len(load_replies()))


def test_a_hidden_layer_and_sentence_pieces_score_the_same_in_training_and_serving(
    tmp_path, monkeypatch
):
    """`train --hidden N --pieces K` (measured in classifier.py's docstring): the scores train.py
    chooses thresholds on are the ones Classifier.scores gives a served message, idioms blanked
    on both sides (the last two rows have one)."""
    monkeypatch.setattr(train, "HIDDEN", 8)
    monkeypatch.setattr(train, "PIECES", 4)
    monkeypatch.setattr(train, "STEPS", 20)
    rows = load_examples("en")[::400] + load_examples("zh")[::400]
    rows += [
        Example("this exam is killing me. pray for me lol", "none", "idiom", "en-x", "en"),
        Example("想死你们了！下周回来。到时候一起吃饭", "none", "idiom", "zh-x", "zh"),
        Example(
            "这段时间我总是想家里的事情，睡不着。" * 8 + "我不想活了",
            "suicide",
            "suicide",
            "zh-y",
            "zh",
        ),
    ]
    texts = [e.text for e in rows]
    embedder = Embedder()
    x = train.featurize(texts, embedder)
    split = train.split_messages(texts, embedder, None, train.MAX_CHARS, 1)
    assert split is not None and len(set(split.owner.tolist())) >= 3
    params = train.fit(x, train.targets(rows), "both")
    assert params[3].shape == (384, 8) and np.abs(params[5]).max() > 0
    # the n-gram block goes to disk as float16 (train.save): score what serving loads
    expected = train.score(train.as_stored(params), x, np.ones(len(texts), bool), split)
    # the training messages' vote moves each message's scores by its neighbours' crisis share
    n = train.build_neighbours(x.embed, train.labels(rows).any(axis=1))
    # a message projected as serving does lands on its stored code (the bank training votes
    # with), but for a rare entry one rounding step apart
    moved = n.codes_of(x.embed).astype(int) - n.codes
    assert np.abs(moved).max() <= 1 and np.count_nonzero(moved) <= moved.size // 1000
    votes = n.vote(n.project(x.embed), n.bank(), n.crisis)
    assert votes.min() < 0 < votes.max()
    expected = with_vote(expected, votes, n.beta)
    out = tmp_path / "weights.npz"
    train.save(out, params, np.full(len(CATEGORIES), 0.5), "0" * 64, n)
    classifier = Classifier(load_weights(out))
    lex = train.builtin_lexicon()
    norm = [normalize(t, train.MAX_CHARS) for t in texts]
    assert sum(classifier_text(lex, t) != t for t in norm) >= 2
    assert classifier.w.embed_tokens == 48 and classifier.embedder is not None
    assert classifier.embedder.tail(norm[-1], 48) != norm[-1]  # the embedding reads a tail
    served = np.array([classifier.scores(classifier_text(lex, t)) for t in norm])
    np.testing.assert_allclose(served, expected, atol=1e-5)


def tiny_bank(codes: list[list[int]], crisis: list[bool], k: int) -> Neighbours:
    """Two directions (the embedding's first two axes), codes in steps of 0.2."""
    basis = np.zeros((384, 2), np.float32)
    basis[0, 0] = basis[1, 1] = 1
    return Neighbours(
        np.zeros(384, np.float32),
        basis,
        np.full(2, 0.2, np.float32),
        np.array(codes, np.int8),
        np.array(crisis),
        k,
        0.5,
        0.05,
    )


def test_the_vote_is_the_crisis_share_of_the_nearest_weighted_by_closeness():
    """Query (0.6, 0.8): cosines 0.8 (ordinary), 0.6, 0.6 (crisis) and -0.6 (crisis, not among
    the 3 nearest). Weights exp((cos - 0.8) / 0.05): 1, e^-4, e^-4, so the crisis share is
    2e^-4 / (1 + 2e^-4) and its log-odds log(2) - 4."""
    n = tiny_bank([[0, 5], [5, 0], [5, 0], [-5, 0]], [False, True, True, True], k=3)
    query = np.zeros((1, 384), np.float32)
    query[0, :2] = [0.6, 0.8]
    vote = n.vote(n.project(query), n.bank(), n.crisis)
    np.testing.assert_allclose(vote, [np.log(2) - 4], atol=1e-5)
    # added to each category's log-odds, times beta: p becomes sigmoid(logit(p) + 0.5 * vote)
    moved = with_vote(np.array([[0.5, 0.9]]), vote, n.beta)
    shift = 0.5 * (np.log(2) - 4)
    np.testing.assert_allclose(moved, [[1 / (1 + np.exp(-shift)), 1 / (1 + np.exp(-shift) / 9)]])
    # a unanimous vote is held at 0.98 (log-odds log(49)): one neighbour never decides alone
    alone = tiny_bank([[0, 5], [5, 0]], [True, False], k=1)
    assert alone.vote(alone.project(query), alone.bank(), alone.crisis) == pytest.approx(np.log(49))


def test_out_of_fold_votes_come_from_the_other_folds_only():
    """Message 0 (crisis) has its twin, message 1, in its own fold: out of fold, only the other
    folds' ordinary messages vote for it, as only strangers will for a new message."""
    n = tiny_bank([[5, 0], [5, 0], [4, 3], [0, 5]], [True, True, False, False], k=1)
    folds = np.array([0, 0, 1, 2])
    votes = train.out_of_fold_votes(n, folds)
    np.testing.assert_allclose(votes, np.log([1 / 49, 1 / 49, 49, 1 / 49]), rtol=1e-5)


def test_the_weights_comparison_allows_only_a_few_small_n_gram_drifts():
    ngram = (np.random.default_rng(0).standard_normal((1000, 5)) * 0.01).astype(np.float16)
    shipped = {"embed": np.zeros(3), "ngram": ngram}

    def moved(n: int, by: float) -> dict[str, np.ndarray]:
        out = ngram.copy()
        out.flat[:n] += np.float16(by)
        return {"embed": np.zeros(3), "ngram": out}

    assert_same_weights(moved(NGRAM_DRIFT, 0.01), shipped, ("embed",))
    for n, by, says in ((NGRAM_DRIFT + 1, 0.01, "101 n-gram weights"), (1, 0.05, "moved by")):
        with pytest.raises(AssertionError, match=says):
            assert_same_weights(moved(n, by), shipped, ("embed",))
    with pytest.raises(AssertionError, match="embed"):
        assert_same_weights({**shipped, "embed": np.ones(3)}, shipped, ("embed",))
