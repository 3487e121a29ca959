"""The training data, the shipped weights, retraining, and a fresh install carrying them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from soulray.safety.classifier import CATEGORIES, load_weights, weights_path
from soulray.safety.dataset import LANGS, build_examples, load_examples

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("lang", LANGS)
def test_the_committed_training_set_is_the_generator_output_and_covers_the_brief(lang):
    rows = load_examples(lang)
    assert rows == build_examples(lang)  # data/train_{lang}.jsonl is regenerated, not edited
    assert len(rows) >= 1500
    labels = Counter(e.label for e in rows)
    kinds = Counter(e.kind for e in rows if e.label == "none")
    assert all(labels[c] >= 150 for c in CATEGORIES)
    assert {"idiom", "grief", "friend", "media", "medication", "sadness"} <= set(kinds)
    assert len({e.text for e in rows}) == len(rows)  # no duplicate messages


def test_the_shipped_weights_are_small_and_carry_out_of_fold_thresholds():
    w = load_weights()
    assert weights_path().stat().st_size < 4 * 2**20
    assert w.features == "both" and w.embed.shape == (384, 4) and w.ngram.shape[1] == 4
    assert np.all((w.thresholds >= 0.05) & (w.thresholds <= 0.95))


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_weights(tmp_path):
    """Same data, same seed -> the same weights. Compared to 1e-5, not bit for bit: the dense
    products go through BLAS, whose summation order may change with its thread count."""
    out = tmp_path / "weights.npz"
    subprocess.run(
        [sys.executable, "-m", "soulray.safety.train", "--out", str(out)], check=True, cwd=ROOT
    )
    shipped, again = np.load(weights_path()), np.load(out)
    for key in ("embed", "ngram", "bias", "thresholds"):
        np.testing.assert_allclose(again[key], shipped[key], atol=1e-5, err_msg=key)
    assert str(again["features"]) == str(shipped["features"])


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
        "w = c.load_weights(); print(json.dumps([str(c.weights_path()), w.thresholds.tolist(),"
        " len(d.load_examples('zh'))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    path, thresholds, n = json.loads(out.stdout)
    assert path.startswith(str(target)) and n == len(load_examples("zh"))
    assert thresholds == load_weights().thresholds.tolist()
