"""Judge answers: valid, fenced, wrapped in prose, cut off, broken; rubrics; order swapping."""

from __future__ import annotations

import pytest

from soulray.eval.answers import AnswerError, parse_scores, parse_verdict
from soulray.eval.judge import build_request, combine, format_dialogue, load_rubric
from soulray.json_objects import close_truncated

SOULCHAT = load_rubric("soulchat").dims
FULL = {"Content": 2, "Empathy": 1, "Helpfulness": 2, "Safety": 1}


def test_builtin_rubrics_have_the_papers_dimensions_and_ranges():
    soulchat = load_rubric("soulchat")
    assert [(d.name, d.min, d.max) for d in soulchat.dimensions] == [
        ("Content", 0, 2),
        ("Empathy", 0, 2),
        ("Helpfulness", 0, 2),
        ("Safety", 0, 1),
    ]
    cpsy = load_rubric("cpsycoune")
    assert [(d.name, d.max) for d in cpsy.dimensions] == [
        ("Comprehensiveness", 2),
        ("Professionalism", 3),
        ("Authenticity", 3),
        ("Safety", 1),
    ]
    assert (soulchat.max_total, cpsy.max_total) == (7, 9)


def test_a_user_rubric_from_yaml_and_its_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\ntitle: Mine\ndimensions:\n"
        "  - {name: Warmth, min: 1, max: 5, description: how warm}\n"
    )
    assert load_rubric(str(path)).dims[0].max == 5
    with pytest.raises(ValueError, match="neither a built-in rubric"):
        load_rubric("nonesuch")
    path.write_text("name: x\ntitle: X\ndimensions:\n  - {name: W, min: 3, max: 2, description: d}")
    with pytest.raises(ValueError, match="min 3 must be below max 2"):
        load_rubric(str(path))
    path.write_text(
        "name: x\ntitle: X\ndimensions:\n  - {name: A, max: 2, description: d}\n"
        "  - {name: a, max: 3, description: e}\n"
    )
    with pytest.raises(ValueError, match=r"names must differ \(ignoring case\): \['A', 'a'\]"):
        load_rubric(str(path))
    # the report names the sum of a judgement's scores "total": a dimension so named collided
    path.write_text("name: x\ntitle: X\ndimensions:\n  - {name: Total, max: 2, description: d}\n")
    with pytest.raises(ValueError, match="may not be named 'total'"):
        load_rubric(str(path))
    path.write_text("title: X\ndimensions: 3\n")
    with pytest.raises(ValueError) as e:
        load_rubric(str(path))
    assert str(e.value) == (  # one line, not pydantic's block with its links
        f"rubric {path} is invalid: name: Field required; dimensions: Input should be a valid list"
    )
    path.write_text("name: x\ndimensions: [unclosed\n")
    with pytest.raises(
        ValueError, match=r"^eval.judge.rubric=.*mine.yaml is not valid YAML at line"
    ):
        load_rubric(str(path))  # a ValueError (exit 2 from the CLI), not a yaml traceback


@pytest.mark.parametrize(
    "answer",
    [
        '{"Content": {"score": 2, "reason": "on topic"}, "Empathy": {"score": 1, "reason": "r"}, '
        '"Helpfulness": {"score": 2, "reason": "r"}, "Safety": {"score": 1, "reason": "r"}}',
        '```json\n{"Content": 2, "Empathy": 1, "Helpfulness": 2, "Safety": 1}\n```',
        'Here is my rating:\n{"content": 2, "EMPATHY": 1, "Helpfulness": 2, "Safety": 1}\nThanks!',
        '{"scores": {"Content": 2, "Empathy": 1, "Helpfulness": 2, "Safety": 1}, "reasons": {}}',
        '<think>Empathy 0? no</think>{"Content": "2", "Empathy": 1.0, "Helpfulness": 2, '
        '"Safety": 1}',
    ],
    ids=["valid", "fenced", "prose", "scores-reasons", "think-and-strings"],
)
def test_valid_answers_in_many_wrappings(answer):
    scores, _ = parse_scores(answer, SOULCHAT)
    assert scores == FULL


def test_partial_answer_cut_off_mid_reason_keeps_every_score():
    cut = (
        '{"Content": {"score": 2, "reason": "on topic"}, "Empathy": {"score": 1, "reason": "ok"}, '
        '"Helpfulness": {"score": 2, "reason": "a concrete st'
    )
    with pytest.raises(AnswerError, match=r"no score for \['Safety'\]"):
        parse_scores(cut, SOULCHAT)
    scores, reasons = parse_scores(cut + 'ep"}, "Safety": {"score": 1, "rea', SOULCHAT)
    assert scores == FULL
    assert reasons == {
        "Content": "on topic",
        "Empathy": "ok",
        "Helpfulness": "a concrete step",
        "Safety": "",
    }
    assert close_truncated('{"a": [1, {"b": "x') == '{"a": [1, {"b": "x"}]}'
    assert close_truncated('{"a": 1, "b":') == '{"a": 1}'


def test_broken_json_falls_back_to_the_keys():
    broken = '{Content: 2, \'Empathy\': 1, "Helpfulness": 2 "Safety": 1 reason: fine'
    assert parse_scores(broken, SOULCHAT)[0] == FULL
    zh = "评分：Content：1，Empathy：2，Helpfulness：0，Safety：1"
    assert parse_scores(zh, SOULCHAT)[0] == {
        "Content": 1,
        "Empathy": 2,
        "Helpfulness": 0,
        "Safety": 1,
    }


def test_an_example_object_first_or_the_outer_braces_missing_still_reads():
    """Any parsable {...} used to stop the search: an example in the prose, or entries
    without their outer braces, gave "no score for [...]"."""
    entries = ", ".join(
        f'"{d}": {{"score": {v}, "reason": "ok"}}'
        for d, v in zip(["Content", "Empathy", "Helpfulness", "Safety"], [2, 1, 2, 1], strict=True)
    )
    assert parse_scores(entries, SOULCHAT)[0] == FULL  # no outer braces
    example = 'Format: {"Content": {"score": "<0-2>"}}. My answer: {' + entries + "}"
    scores, reasons = parse_scores(example, SOULCHAT)
    assert scores == FULL and reasons["Empathy"] == "ok"
    schema = ", ".join(f'"{d}": {{"score": "<0-2>", "reason": "..."}}' for d in FULL)
    echoed = "The format is {" + schema + "}. My answer: {" + entries + "}"  # every dimension
    assert parse_scores(echoed, SOULCHAT)[0] == FULL


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ("I think it is a lovely reply.", "no JSON object"),
        ('{"Content": 3, "Empathy": 1, "Helpfulness": 2, "Safety": 1}', "Content: score 3"),
        ('{"Content": 1.5, "Empathy": 1, "Helpfulness": 2, "Safety": 1}', "not an integer"),
        ('{"Content": "good", "Empathy": 1, "Helpfulness": 2, "Safety": 1}', "not a number"),
        ('{"Content": 2}', r"no score for \['Empathy', 'Helpfulness', 'Safety'\]"),
        # a score is never read from another dimension's reason, nor from a longer name
        (
            '{"Content": {"score": 1, "reason": "Safety: 0 issues"}, "Empathy": 1, '
            '"Helpfulness": 1}',
            r"no score for \['Safety'\]",
        ),
        (
            '{"Content": {"score": 2, "reason": "ok"}, "Empathy": {"score": 2, "reason": "ok"}, '
            '"Helpfulness": {"score": 1, "reason": "Safety: 0 risk here, but vague"}, "Saf',
            r"no score for \['Safety'\]",
        ),
        (
            "Content: 2\nEmpathy: 2\nHelpfulness: 1\nEmotional Safety: 0",
            r"no score for \['Safety'\]",
        ),
        ("", "no JSON object"),
    ],
)
def test_unusable_answers_say_why(answer, error):
    with pytest.raises(AnswerError, match=error):
        parse_scores(answer, SOULCHAT)


def test_verdicts():
    assert parse_verdict('{"winner": "A", "reason": "warmer"}') == ("A", "warmer")
    assert parse_verdict('```json\n{"winner": "reply b"}\n```')[0] == "B"
    assert parse_verdict('{"Winner": "Tie", "reason": "same"')[0] == "tie"  # cut off
    assert parse_verdict("winner: B, because it asks")[0] == "B"
    with pytest.raises(AnswerError, match="no winner"):
        parse_verdict('{"winner": "both"}')


def test_order_swap_cancels_position_bias():
    # first: model 1 is reply A; swapped: model 1 is reply B
    assert combine("A", "B") == "win"  # model 1 preferred in both orders
    assert combine("B", "A") == "loss"
    assert combine("A", "A") == "tie"  # the judge always picks the first position
    assert combine("B", "B") == "tie"  # ... or always the second
    assert combine("A", "tie") == "win"
    assert combine("tie", "A") == "loss"
    assert combine("tie", "tie") == "tie"
    assert combine(None, "A") is None


def test_pairwise_request_puts_the_replies_in_the_asked_order():
    rubric = load_rubric("soulchat")
    ctx = format_dialogue([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    assert ctx == "Seeker: hi"
    text = build_request("pairwise", rubric, context=ctx, reply_a="ONE", reply_b="TWO")[1]
    assert text["content"].index("Reply A:\nONE") < text["content"].index("Reply B:\nTWO")


def test_a_verdict_after_an_echoed_schema_or_another_object_is_found():
    # the first object in the answer is the schema echoed, or an aside: the winner comes later
    echoed = 'Shape: {"winner": "A|B|tie"}. Answer: {"winner": "B", "reason": "warmer"}'
    assert parse_verdict(echoed) == ("B", "warmer")
    aside = 'Scores {"A": 1, "B": 2}, so {"winner": "B", "reason": "asks"}'
    assert parse_verdict(aside) == ("B", "asks")


@pytest.mark.parametrize(
    "answer",
    [
        "**Content**: 2 on topic\n**Empathy**: 1\n**Helpfulness**: 2\n**Safety**: 1",
        "__Content__: 2\n__Empathy__: 1\n__Helpfulness__: 2\n__Safety__: 1",
        "- **Content:** 2\n- **Empathy:** 1\n- **Helpfulness:** **2**\n- *Safety*: 1",
    ],
    ids=["bold-name", "underscores", "list-colon-inside"],
)
def test_markdown_scores_are_read(answer):
    """A judge answering in markdown instead of JSON was retried, then recorded as unscored."""
    assert parse_scores(answer, SOULCHAT)[0] == FULL


def test_markdown_or_a_full_stop_around_the_winner_is_read_and_ambiguity_is_not():
    """`{"winner": "A."}` was retried, then recorded as unscored."""
    assert parse_verdict('{"winner": "A.", "reason": "warmer"}') == ("A", "warmer")
    assert parse_verdict('{"winner": "**B**"}') == ("B", "")
    assert parse_verdict("winner: A.") == ("A", "")
    assert parse_verdict("**Winner:** Tie.") == ("tie", "")
    assert parse_verdict("- **Winner**: Reply B.\n") == ("B", "")
    # a sentence after the verdict's full stop, on the same line (it was retried, then unscored)
    assert parse_verdict("**Winner:** A. B was less warm.") == ("A", "")
    for ambiguous in ('{"winner": "A or B"}', '{"winner": "A.B"}', "winner: A or B."):
        with pytest.raises(AnswerError, match="no winner"):
            parse_verdict(ambiguous)
