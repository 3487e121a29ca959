"""Every benchmark script answers --help (a user's first call) without running anything."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from soulray_testing import ROOT

# the scripts (serve_soak.py is a module serve_load.py imports)
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text())


# Runs a script's main() with ArgumentParser.parse_args replaced: instead of parsing, it prints
# the help (what --help shows) and then every option and positional (sub-commands' too) whose help
# text is missing, and exits. Nothing after parse_args runs; bench/ is sys.path[0], as with
# `python bench/X.py`.
UNDOCUMENTED = r"""
import argparse, json, os, runpy, sys

def undocumented(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from undocumented(sub, f"{prefix}{name} ")
        elif not (action.help or "").strip():
            yield prefix + (action.option_strings[-1] if action.option_strings else action.dest)

def report(self, *args, **kwargs):
    print(self.format_help())
    print(json.dumps(list(undocumented(self))))
    sys.exit(0)

argparse.ArgumentParser.parse_args = report
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_shows_usage_and_every_option_has_help_text(script) -> None:
    """One process per script (each imports torch or Ray): its help, then the undocumented."""
    done = subprocess.run(
        [sys.executable, "-c", UNDOCUMENTED, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_every_bench_script_is_checked() -> None:
    assert len(SCRIPTS) >= 14  # a rename that empties the glob must not pass silently


def test_replies_without_room_names_a_corpus_that_matches_no_file(tmp_path) -> None:
    missing = tmp_path / "nothing-*.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replies_without_room.py"), "--corpus", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr == f"bench/replies_without_room.py: no file matches {missing}\n"
    assert done.stdout == ""


def test_safety_eval_writes_out_into_a_folder_that_does_not_exist_yet(tmp_path) -> None:
    blind = tmp_path / "blind.json"
    blind.write_text(
        json.dumps(
            {
                "en": {
                    "crisis": [{"text": "I want to kill myself", "category": "suicide"}],
                    "ordinary": [{"text": "see you tomorrow", "kind": "everyday"}],
                }
            }
        )
    )
    out = tmp_path / "new" / "report.json"
    safety_eval_lexicon_only(blind, out)
    report = json.loads(out.read_text())
    assert (report["en"]["crisis"], report["en"]["recall"], report["en"]["fpr"]) == (1, 1.0, 0.0)


def safety_eval_lexicon_only(blind: Path, out: Path) -> None:
    """bench/safety_eval.py --lexicon-only on `blind`, its report in `out`."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "safety_eval.py"), "--blind", str(blind)]
        + ["--lexicon-only", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("labels", [{}, {"crisis_en_category": ["suicide", "suicide"]}])
def test_safety_eval_reads_the_older_blind_sets(tmp_path, labels) -> None:
    """Blind sets 1-2 have no labels, 3-4 crisis categories without ordinary kinds."""
    blind = tmp_path / "blind.json"
    texts = {
        "crisis_en": ["I want to kill myself", "i had a nice walk"],
        "ordinary_en": ["see you tomorrow"],
    }
    blind.write_text(json.dumps(texts | labels))
    out = tmp_path / "report.json"
    safety_eval_lexicon_only(blind, out)
    report = json.loads(out.read_text())["en"]
    category = "suicide" if labels else "?"
    assert report["categories"] == {
        category: {"n": 2, "recall": 0.5, "same_category": 0.5 if labels else None}
    }
    assert report["ordinary_kinds"] == {"?": {"n": 1, "fpr": 0.0}}


def test_data_prep_deletes_its_corpus_and_prepared_outputs(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("data_prep", ROOT / "bench" / "data_prep.py")
    assert spec is not None and spec.loader is not None
    data_prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_prep)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(data_prep.tempfile, "mkdtemp", lambda prefix: str(work))
    convs = [{"id": 0, "topic": "bench", "messages": []}]
    monkeypatch.setattr(data_prep, "soulchat_shaped", lambda n, seed: convs)
    monkeypatch.setattr(data_prep, "rendered_texts", lambda convs, tok: ["text"])
    raw = {"tokens": 100, "tokens_per_s": 50.0}
    monkeypatch.setattr(data_prep, "raw_tokenizer", lambda texts, tok: raw)
    monkeypatch.setattr(data_prep, "expansion_tokens", lambda convs, tok: 300)

    def run_prepare(files, out, cpus, mode, seq_len, tokenizer_dir):
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        m = {"tokens": 100, "rows": 1, "packing_efficiency": 0.5, "conversations": 1, "rejected": 0}
        return m, 4.0 / cpus

    monkeypatch.setattr(data_prep, "run_prepare", run_prepare)
    a = argparse.Namespace(conversations=1, seed=0, files=1, seq_len=64)
    result = data_prep.multi_file(a, None, "tok")
    assert (result["scaling_1_to_2_cpus"], result["expansion_vs_soulray_tokens"]) == (2.0, 3.0)
    assert not work.exists()


def test_safety_weights_diff_refuses_a_missing_weights_file_before_screening(tmp_path) -> None:
    missing = tmp_path / "w.npz"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "safety_weights_diff.py"), str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.endswith(f"error: no weights file at {missing}\n")


@pytest.mark.parametrize(
    "script, ends",
    [
        ("safety_fit.py", "and whether the weights come out the same."),
        ("safety_weights_diff.py", "and how many messages change their flag."),
        ("train_throughput.py", "target Ray overhead <= 3 %."),
    ],
)
def test_help_shows_the_whole_first_paragraph(script, ends) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ends in " ".join(done.stdout.split())


@pytest.mark.parametrize(
    "script, args, option",
    [
        ("safety_latency.py", ["--stride", "0"], "--stride"),  # was a ValueError mid-run
        ("safety_eval.py", ["--blind", "{missing}"], "--blind"),  # was a FileNotFoundError
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_option(tmp_path, script, args, option) -> None:
    args = [a.format(missing=tmp_path / "missing.json") for a in args]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"error: argument {option}: " in done.stderr.splitlines()[-1]
