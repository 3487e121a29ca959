"""Crisis screen: recall and false-positive rate on messages written for the tests (both
languages), printed in the terminal summary of every run; plus locale, scan window and
configurability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety_cases import (
    CRISIS_EN,
    CRISIS_ZH,
    HELDOUT_CRISIS,
    HELDOUT_ORDINARY,
    ORDINARY_EN,
    ORDINARY_ZH,
    ROUND2_CRISIS,
    ROUND2_ORDINARY,
)

from soulray.config import HelpLine, SafetyConfig
from soulray.serve.safety import assess, build_screen, detect, fixed_reply


@pytest.fixture(scope="module")
def screen():
    return build_screen(SafetyConfig())


def rates(screen, crisis: list[str], ordinary: list[str]) -> tuple[float, float]:
    recall = sum(bool(detect(screen, m)) for m in crisis) / len(crisis)
    fpr = sum(bool(detect(screen, m)) for m in ordinary) / len(ordinary)
    return recall, fpr


@pytest.fixture
def report(safety_report):
    def report(name: str, crisis: list[str], ordinary: list[str], recall: float, fpr: float):
        safety_report(
            f"{name}: recall {recall:.1%} on {len(crisis)} crisis messages, "
            f"false-positive rate {fpr:.1%} on {len(ordinary)} ordinary sad messages"
        )

    return report


@pytest.mark.parametrize(
    "lang,crisis,ordinary", [("en", CRISIS_EN, ORDINARY_EN), ("zh", CRISIS_ZH, ORDINARY_ZH)]
)
def test_recall_and_false_positives_on_the_tuning_sets(screen, report, lang, crisis, ordinary):
    """The sets the built-in lists were tuned on (first blind pass: recall 75%, FPR 0%)."""
    recall, fpr = rates(screen, crisis, ordinary)
    report(f"tuning set ({lang})", crisis, ordinary, recall, fpr)
    assert recall >= 0.95 and fpr <= 0.05


def test_recall_and_false_positives_on_earlier_held_out_rounds(screen, report):
    """Rounds 1 and 2 were held out when written; both have since been looked at while the
    lists grew (round 2: 8.3% before the warning-sign families, 29.2% after, 33.3% after the
    round-3 families), so they are regression sets now, not honest estimates."""
    recall, fpr = rates(screen, ROUND2_CRISIS, ROUND2_ORDINARY)
    report("held-out round 2 (en+zh)", ROUND2_CRISIS, ROUND2_ORDINARY, recall, fpr)
    tuned_recall, tuned_fpr = rates(screen, HELDOUT_CRISIS, HELDOUT_ORDINARY)
    report("held-out round 1 (en+zh)", HELDOUT_CRISIS, HELDOUT_ORDINARY, tuned_recall, tuned_fpr)
    assert fpr <= 0.05 and tuned_fpr <= 0.05
    assert recall >= 8 / 24 and tuned_recall >= 23 / 24  # floors at today's measured values


HERE = Path(__file__).parent
ROUND3 = json.loads((HERE / "safety_holdout_blind.json").read_text("utf-8"))
BLIND = json.loads((HERE / "safety_holdout_blind2.json").read_text("utf-8"))


@pytest.mark.parametrize("lang,floor,ceiling", [("en", 40 / 40, 3 / 40), ("zh", 39 / 40, 2 / 40)])
def test_recall_and_false_positives_on_round_3(screen, report, lang, floor, ceiling):
    """safety_holdout_blind.json was the blind set of the previous round (measured once: en
    recall 47.5% FPR 10.0%, zh 62.5% / 5.0%); its misses were then read and the lists grew by
    general families (word forms, finality, method, burden, goodbyes), so it is a regression
    set now. Floor and ceiling are today's values."""
    crisis, ordinary = ROUND3[f"crisis_{lang}"], ROUND3[f"ordinary_{lang}"]
    recall, fpr = rates(screen, crisis, ordinary)
    report(f"held-out round 3 ({lang})", crisis, ordinary, recall, fpr)
    assert recall >= floor and fpr <= ceiling


@pytest.mark.parametrize("lang,floor,ceiling", [("en", 24 / 40, 0 / 40), ("zh", 23 / 40, 1 / 40)])
def test_recall_and_false_positives_on_the_blind_set(screen, report, lang, floor, ceiling):
    """safety_holdout_blind2.json was written by someone who never saw soulray/ or tests/, after
    the lists were final, and measured once; the lists are never tuned on it, and its messages
    are not read. This is the honest figure: en recall 60.0% FPR 0.0%, zh recall 57.5% FPR 2.5%
    (the lists before round 3 scored 47.5% / 0.0% and 55.0% / 2.5% on it).
    A keyword screen catches explicit language and misses much oblique ideation; it is a
    floor under a classifier, not a substitute for one. Floor and ceiling are today's values."""
    crisis, ordinary = BLIND[f"crisis_{lang}"], BLIND[f"ordinary_{lang}"]
    recall, fpr = rates(screen, crisis, ordinary)
    report(f"blind set ({lang})", crisis, ordinary, recall, fpr)
    assert recall >= floor and fpr <= ceiling


def test_categories_and_idioms(screen):
    assert detect(screen, "I want to kill myself") == ["suicide"]
    assert detect(screen, "我又开始割腕了") == ["self_harm"]
    assert detect(screen, "I'm going to stab him tomorrow") == ["violence"]
    for idiom in ["this traffic is killing me", "I'm dead tired", "累死了", "想死你了", "跳楼价"]:
        assert detect(screen, idiom) == [], idiom


def test_assess_scans_latest_user_turns_and_picks_locale(screen):
    info = assess(screen, ["我不想活了", "谢谢你"])
    assert info.flagged and info.locale == "zh-CN" and info.categories == ["suicide"]
    assert [r.contact for r in info.resources][0] == "12356"
    en = assess(screen, ["I want to end my life", "ok"])
    assert en.flagged and en.locale == "en-US" and "988" in en.resources[0].contact
    old = assess(screen, ["I want to end my life", "thanks", "what about my sleep?"])
    assert not old.flagged  # only the latest scan_user_turns (2) messages are screened
    assert "988" in fixed_reply(screen, en)


def test_lexicon_patterns_and_resources_are_configurable():
    cfg = SafetyConfig(
        lexicon={"suicide": ["unalive"]},
        patterns={},
        exclude=[],
        locale="en-GB",
        resources={
            "en-GB": [HelpLine(name="Samaritans", contact="116 123")],
            "en-US": [HelpLine(name="988", contact="988")],
        },
        fixed_reply={"en-GB": "Please reach out.", "en-US": "Please reach out."},
    )
    custom = build_screen(cfg)
    info = assess(custom, ["I want to unalive"])
    assert info.flagged and info.resources[0].contact == "116 123"
    assert not assess(custom, ["I want to die"]).flagged  # the built-in lexicon was replaced
    with pytest.raises(ValueError, match="not a valid regex"):
        build_screen(SafetyConfig(patterns={"suicide": ["(unclosed"]}))
    with pytest.raises(ValueError, match="no resources"):
        build_screen(SafetyConfig(locale="fr-FR"))
