"""Cleaning rules on hand-written conversations: every change is counted, nothing else changes."""

from __future__ import annotations

import re

import pytest

from soulray.config import StrategyConfig
from soulray.data.conversation import (
    Conversation,
    Message,
    RecordError,
    build_strategy_lookup,
    check_encodable,
    clean_conversation,
    count_target_turns,
)

LOOKUP = build_strategy_lookup(StrategyConfig())


def conv(*turns: tuple[str, str] | tuple[str, str, str]) -> Conversation:
    return Conversation("c1", "test", "topic", [Message(*t) for t in turns])


def clean(c: Conversation, system_prompt: str | None = None):
    return clean_conversation(c, LOOKUP, "Others", system_prompt)


def triples(c: Conversation) -> list[tuple[str, str, str | None]]:
    return [(m.role, m.content, m.strategy) for m in c.messages]


def test_strip_drop_empty_and_merge_keep_first_strategy():
    raw = conv(
        ("user", "  I lost my job.  "),
        ("user", "\u3000"),  # an ideographic space is whitespace too
        ("user", "\nAnd my flat.\n"),
        ("assistant", "", "Question"),
        ("assistant", "That is a lot at once.", "reflection of feelings"),
        ("assistant", "How are you holding up?", "Questions"),
        ("user", "Badly."),
    )
    cleaned, stats = clean(raw)
    assert triples(cleaned) == [
        ("user", "I lost my job.\nAnd my flat.", None),
        ("assistant", "That is a lot at once.\nHow are you holding up?", "Reflection of feelings"),
        ("user", "Badly.", None),
    ]
    assert (stats.empty_turns, stats.merged_turns, stats.unknown_strategies) == (2, 2, {})
    assert stats.strategies_dropped == 1  # "Questions" gave way to "Reflection of feelings"
    assert (cleaned.id, cleaned.source, cleaned.topic) == ("c1", "test", "topic")
    assert raw.messages[0].content == "  I lost my job.  "  # the input is not modified


def test_merge_takes_the_later_strategy_when_the_first_has_none():
    cleaned, _ = clean(conv(("user", "hi"), ("assistant", "Hello."), ("assistant", "Why?", "Q")))
    assert cleaned.messages[1].strategy == "Others"  # "Q" is unknown -> the fallback


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Question", "Question"),
        ("questions", "Question"),
        ("[Others]", "Others"),
        ("Other", "Others"),
        (" Approval and Reassurance ", "Affirmation and Reassurance"),
        ("Restatement", "Restatement or Paraphrasing"),
        ("SELF-DISCLOSURE", "Self-disclosure"),
        ("", None),
        ("[]", None),
    ],
)
def test_strategy_aliases(raw, expected):
    cleaned, stats = clean(conv(("user", "u"), ("assistant", "a", raw)))
    assert cleaned.messages[1].strategy == expected
    assert stats.unknown_strategies == {}


def test_unknown_strategies_are_counted_by_name():
    cleaned, stats = clean(
        conv(
            ("user", "u"),
            ("assistant", "a", "Direct Guidance"),
            ("user", "u2"),
            ("assistant", "b", "[Direct Guidance]"),
            ("user", "u3", "Venting"),  # a user turn's label is dropped, not counted
            ("assistant", "c", "Humour"),
        )
    )
    assert [m.strategy for m in cleaned.messages[1::2]] == ["Others"] * 3
    assert [m.strategy for m in cleaned.messages[0::2]] == [None] * 3
    assert stats.unknown_strategies == {"Direct Guidance": 2, "Humour": 1}


def test_user_turns_carry_no_strategy():
    cleaned, _ = clean(conv(("user", "u", "Question"), ("assistant", "a")))
    assert cleaned.messages[0].strategy is None
    merged, _ = clean(conv(("user", "u"), ("user", "v", "Question"), ("assistant", "a")))
    assert triples(merged)[0] == ("user", "u\nv", None)  # not even through a merge


def test_leading_assistant_greeting_is_kept_but_not_a_target():
    cleaned, _ = clean(
        conv(("assistant", "Hi, I'm here."), ("user", "Hi."), ("assistant", "Go on."))
    )
    assert [m.role for m in cleaned.messages] == ["assistant", "user", "assistant"]
    assert count_target_turns(cleaned.messages) == 1


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([], "empty_conversation"),
        ([("user", " "), ("assistant", "\n\t")], "empty_conversation"),
        ([("user", "Anyone?")], "no_assistant_turn"),
        ([("assistant", "Hello, how can I help?")], "no_assistant_turn"),
        ([("system", "Be kind."), ("user", "hi"), ("assistant", "  ")], "no_assistant_turn"),
    ],
)
def test_rejections(turns, reason):
    with pytest.raises(RecordError) as info:
        clean(conv(*turns))
    assert info.value.reason == reason


def test_system_prompt_added_only_when_missing():
    added, _ = clean(conv(("user", "u"), ("assistant", "a")), system_prompt="Be kind.")
    assert triples(added)[0] == ("system", "Be kind.", None)
    own, _ = clean(conv(("system", "Mine."), ("user", "u"), ("assistant", "a")), "Be kind.")
    assert [m.content for m in own.messages] == ["Mine.", "u", "a"]


def test_content_hash_ignores_id_source_topic_and_strategy():
    a = conv(("user", "u"), ("assistant", "a", "Question"))
    b = Conversation("other", "elsewhere", None, [Message("user", "u"), Message("assistant", "a")])
    assert a.content_hash() == b.content_hash()
    swapped = conv(("assistant", "u"), ("user", "a"))
    joined = conv(("user", "ua"))  # separators keep ("u", "a") apart from ("ua",)
    assert len({a.content_hash(), swapped.content_hash(), joined.content_hash()}) == 3


def test_user_turns_after_the_last_reply_are_not_part_of_its_identity():
    """A sample "u1 a1 u2" of the dialogue "u1 a1 u2 a2" trains a1, which the dialogue trains:
    its content hash is that of "u1 a1", one of the dialogue's prefixes, so dedupe collapses
    it (it was kept, and a1 trained twice). Two records that differ only after their last
    reply are duplicates."""
    sample = conv(("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    dialogue = conv(("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"))
    digest, prefixes, opening = dialogue.content_hashes()
    assert sample.content_hash() == conv(("user", "u1"), ("assistant", "a1")).content_hash()
    assert sample.content_hash() in prefixes and sample.content_hash() != digest
    other = conv(("user", "u1"), ("assistant", "a1"), ("user", "something else"))
    assert other.content_hash() == sample.content_hash()
    assert sample.split_hash() == opening  # the split is the opening's, as before
    assert conv(("user", "u1")).content_hash() != conv(("user", "u2")).content_hash()


def test_json_round_trip():
    a = Conversation(
        "é-1", "esconv", None, [Message("user", "我很难过"), Message("assistant", "嗯", "Others")]
    )
    text = a.to_json()
    assert "我很难过" in text  # not \u-escaped
    assert Conversation.from_json(text) == a


def test_alias_outside_taxonomy_is_refused():
    bad = StrategyConfig(aliases={"Nudge": "Nudging"})
    with pytest.raises(ValueError, match="'Nudging', which is not in data.strategies.taxonomy"):
        build_strategy_lookup(bad)
    with pytest.raises(ValueError, match="fallback 'Misc' is not in data.strategies.taxonomy"):
        build_strategy_lookup(StrategyConfig(fallback="Misc"))


def test_a_custom_taxonomy_needs_no_emptying_of_the_built_in_aliases():
    """The ESConv spellings built in (Questions -> Question, ...) are for ESConv's taxonomy:
    with another one they are left out, not refused (the error named a default the user never
    wrote); the fallback must still be one of the user's names, and the error says so."""
    cfg = StrategyConfig(taxonomy=["Empathy", "Advice"], fallback="Empathy")
    assert build_strategy_lookup(cfg) == {"empathy": "Empathy", "advice": "Advice"}
    with pytest.raises(ValueError, match="set data.strategies.fallback to the one unknown names"):
        build_strategy_lookup(StrategyConfig(taxonomy=["Empathy", "Advice"]))


def test_custom_taxonomy():
    cfg = StrategyConfig(
        taxonomy=["Ask", "Comfort", "Other"], aliases={"q": "Ask"}, fallback="Other"
    )
    lookup = build_strategy_lookup(cfg)
    assert lookup == {"ask": "Ask", "comfort": "Comfort", "other": "Other", "q": "Ask"}


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        (Conversation("a\ud83d", "s", None, [Message("user", "hi")]), "id"),
        (Conversation("a", "s", "\udc00", [Message("user", "hi")]), "topic"),
        (
            Conversation(
                "a", "s", None, [Message("user", "hi"), Message("assistant", "ok", "\ud800x")]
            ),
            "messages[1].strategy",
        ),
    ],
)
def test_text_without_a_utf8_form_is_a_record_error(bad, where):
    with pytest.raises(RecordError, match=rf"^invalid_record: {re.escape(where)} has an unpaired"):
        check_encodable(bad)
    check_encodable(Conversation("a", "s", "t", [Message("user", "心 \U0001f494")]))  # whole: fine
