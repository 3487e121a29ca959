"""bench/safety_blind_assemble.py: a new blind set keeps only messages never seen before."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from soulray_testing import ROOT

spec = importlib.util.spec_from_file_location(
    "safety_blind_assemble", ROOT / "bench" / "safety_blind_assemble.py"
)
assert spec is not None and spec.loader is not None
assemble_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(assemble_mod)


def writer(crisis_en, ordinary_en):
    return {
        "crisis_en": crisis_en,
        "crisis_en_category": ["suicide"] * len(crisis_en),
        "ordinary_en": ordinary_en,
        "ordinary_en_kind": ["everyday"] * len(ordinary_en),
        "crisis_zh": ["我不想活了,真的"],
        "crisis_zh_category": ["suicide"],
        "ordinary_zh": [],
        "ordinary_zh_kind": [],
    }


def test_seen_and_repeated_messages_are_dropped_and_the_rest_kept_in_order():
    seen = {"en": {"i want to die"}, "zh": set()}
    a = writer(["I want to die ", "the rope is in the car"], ["see you tomorrow", "ok"])
    b = writer(["THE ROPE IS IN THE CAR", "bought pills today"], ["ok"])
    data, dropped = assemble_mod.assemble([a, b], seen)
    assert data["crisis_en"] == ["the rope is in the car", "bought pills today"]
    assert data["crisis_en_category"] == ["suicide", "suicide"]
    assert data["ordinary_en"] == ["see you tomorrow", "ok"]
    assert data["crisis_zh"] == ["我不想活了,真的"]  # the second writer's copy dropped
    assert dropped == {"crisis_en": 2, "ordinary_en": 1, "crisis_zh": 1}


def test_every_shipped_and_test_message_counts_as_seen():
    seen = assemble_mod.seen_messages()
    blind17 = json.loads((ROOT / "tests/safety/safety_holdout_blind17.json").read_text("utf-8"))
    training = json.loads((ROOT / "soulray/safety/data/messages_zh.json").read_text("utf-8"))
    assert blind17["ordinary_en"][0].strip().lower() in seen["en"]
    assert training["suicide"][0].strip().lower() in seen["zh"]


def test_rebuilding_a_set_does_not_count_its_own_messages_and_needs_force(tmp_path):
    seen = assemble_mod.seen_messages(but=ROOT / "tests/safety/safety_holdout_blind17.json")
    blind17 = json.loads((ROOT / "tests/safety/safety_holdout_blind17.json").read_text("utf-8"))
    assert blind17["ordinary_en"][0].strip().lower() not in seen["en"]
    out = tmp_path / "blind.json"
    out.write_text("{}")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/safety_blind_assemble.py"), "--out", str(out)]
        + ["--description", "x", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "exists; a blind set is written once" in done.stderr
    assert out.read_text() == "{}"
