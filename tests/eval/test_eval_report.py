"""Report pieces on hand-made data: strategy distributions, pairwise rates, the gate's rules."""

from __future__ import annotations

import pytest

from soulray.eval.config import GateConfig
from soulray.eval.contexts import Context
from soulray.eval.gate import check_gate
from soulray.eval.markdown import strategy_section
from soulray.eval.report import pairwise_summary, strategy_summary


def ctx(i: int, strategy: str | None) -> Context:
    return Context(f"c{i}", "conv", 1, "en", [{"role": "user", "content": "hi"}], "ref", strategy)


def test_strategy_distribution_against_the_reference():
    contexts = [
        ctx(0, "Question"),
        ctx(1, "Question"),
        ctx(2, "Reflection of feelings"),
        ctx(3, None),
    ]
    replies = {
        "tuned": [
            {"strategy": s} for s in ("Question", "Reflection of feelings", None, "Question")
        ],
        "plain": [{"strategy": None}] * 4,  # reports no strategy: left out
    }
    s = strategy_summary(contexts, replies)
    assert s["reference"] == {"Question": 2, "Reflection of feelings": 1}
    assert s["models"] == {"tuned": {"Question": 2, "Reflection of feelings": 1}}
    assert s["tvd"] == {"tuned": pytest.approx(0.0)}
    replies["tuned"] = [{"strategy": "Information"}] * 2 + [{"strategy": "Question"}] * 2
    s = strategy_summary(contexts, replies)
    # reference Q 2/3, R 1/3; model I 1/2, Q 1/2 -> (|2/3-1/2| + 1/3 + 1/2) / 2 = 1/2
    assert s["tvd"]["tuned"] == pytest.approx(0.5)
    md = "\n".join(strategy_section(s))
    assert (
        "| Question | 0.67 | 0.50 |" in md
        and "| total variation from reference | 0.00 | 0.50 |" in md
    )
    assert strategy_summary(contexts, {"plain": [{"strategy": None}] * 4}) is None


def test_pairwise_rates_leave_unscored_out_and_count_them():
    outcomes = ["win", "win", "tie", "loss", None]
    pair = {"model_1": "a", "model_2": "b", "comparisons": [{"outcome": o} for o in outcomes]}
    s = pairwise_summary(pair, seed=0)
    assert (s["compared"], s["scored"], s["unscored"]) == (5, 4, 1)
    assert (s["win"], s["tie"], s["loss"]) == (2, 1, 1)
    assert (s["win_rate"], s["tie_rate"], s["loss_rate"]) == (0.5, 0.25, 0.25)
    assert s["score"]["mean"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)


def report_with(new: list[float | None], old: list[float | None]) -> dict:
    def rows(values):
        return [
            {"context": f"c{i}", "metrics": {"bleu_4": v} if v is not None else {}, "judge": None}
            for i, v in enumerate(values)
        ]

    models = [{"name": "new"}, {"name": "old"}]
    return {"meta": {"models": models}, "replies": {"new": rows(new), "old": rows(old)}}


def test_gate_rules():
    gate = GateConfig(metric="bleu_4")
    worse = check_gate(report_with([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]), "old", gate, 0)
    assert worse["worse"] and worse["difference"]["mean"] == -1.0
    equal = check_gate(report_with([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]), "old", gate, 0)
    assert not equal["worse"]
    # mixed: one item better, one worse -> the CI spans 0 -> not worse
    noisy = check_gate(report_with([3.0, 1.0], [2.0, 2.0]), "old", gate, 0)
    assert noisy["difference"]["ci"][0] < 0 < noisy["difference"]["ci"][1] and not noisy["worse"]
    # only items both have count; none shared -> nothing shows it is not worse -> refused
    disjoint = check_gate(report_with([1.0, None], [None, 1.0]), "old", gate, 0)
    assert disjoint["difference"]["n"] == 0 and disjoint["worse"]
    assert "no_paired_items" not in worse
    unscored = check_gate(report_with([1.0], [1.0]), "old", GateConfig(metric="judge_total"), 0)
    assert unscored["worse"] and unscored["no_paired_items"] == (
        "no item has a judge_total value for both models (new: 0 of 1, old: 0 of 1; unscored "
        "and failed replies have none, see the report)"
    )
    assert disjoint["no_paired_items"].startswith("no item has a bleu_4 value for both models")
    from soulray.eval.markdown import gate_lines

    assert gate_lines(unscored)[2] == (
        "new vs old on judge_total: promotion refused: no item has a judge_total value for "
        "both models (new: 0 of 1, old: 0 of 1; unscored and failed replies have none, see the "
        "report)."
    )
    with pytest.raises(ValueError, match="both 'new'"):
        check_gate(report_with([1.0], [1.0]), "new", gate, 0)


def test_gate_refuses_a_candidate_that_failed_on_clearly_more_items():
    """Only items both models have a value for are paired: a candidate whose endpoint failed on
    8 of 10 contexts passed on the 2 left."""
    from soulray.eval.markdown import gate_lines

    gate = GateConfig(metric="bleu_4")
    mostly_failed = check_gate(
        report_with([1.0, 2.0] + [None] * 8, [1.0, 2.0] + [3.0] * 8), "old", gate, 0
    )
    assert mostly_failed["worse"] and mostly_failed["difference"]["n"] == 2
    assert gate_lines(mostly_failed)[2] == (
        "new vs old on bleu_4: promotion refused: new has a bleu_4 value on 2 of 10 items, old on "
        "10: failed or unscored on more than 10% of the items more (see the report); difference "
        "0.00 [0.00, 0.00] over 2 paired items."
    )
    # one item more (10 %) is within the margin
    one_more = check_gate(report_with([1.0] * 9 + [None], [1.0] * 10), "old", gate, 0)
    both = check_gate(report_with([1.0] * 5 + [None] * 5, [None] * 5 + [1.0] * 5), "old", gate, 0)
    assert not one_more["worse"] and "more_missing" not in one_more
    assert both["worse"] and "more_missing" not in both  # no pairs at all: refused as before
    fewer_failed = check_gate(report_with([1.0] * 10, [1.0] * 2 + [None] * 8), "old", gate, 0)
    assert not fewer_failed["worse"]


def test_gate_counts_each_sides_failures_without_its_own_seeker_ended_dialogues():
    """Both models have 2 of 10 dialogues the Seeker ended before any reply (no value, nothing
    said of the model); the candidate failed 2 more (a 503): 20 % more missing, refused. The
    baseline's ended dialogues used to cancel the candidate's failures."""
    from soulray.eval.modes import NO_REPLY

    def dialogue(i: int, ended: bool = False, error: str | None = None) -> dict:
        judge = {"scores": {"Content": 2}} if not (ended or error) else None
        if ended:
            judge = {"scores": None, "error": NO_REPLY}
        return {"scenario": f"s{i}", "judge": judge, "error": error, "messages": []}

    base = [dialogue(i, ended=i < 2) for i in range(10)]
    cand = [dialogue(i, ended=i < 2, error="http_503" if 2 <= i < 4 else None) for i in range(10)]
    models = [{"name": "cand"}, {"name": "base"}]
    report = {"meta": {"models": models}, "dialogues": {"cand": cand, "base": base}, "replies": {}}
    verdict = check_gate(report, "base", GateConfig(metric="interactive.judge_total"), 0)
    assert verdict["worse"] and "more_missing" in verdict
    cand = [dialogue(i, ended=i < 2, error="http_503" if i == 2 else None) for i in range(10)]
    report["dialogues"]["cand"] = cand  # one more missing (10 %): within the margin
    assert not check_gate(report, "base", GateConfig(metric="interactive.judge_total"), 0)["worse"]


def test_the_gate_does_not_hold_dialogues_the_seeker_ended_against_the_candidate():
    """A dialogue the Seeker ended before any reply has no value; it says nothing of the model,
    so it is not counted as the candidate's failure (12 scenarios: two such were 'more missing')."""
    from soulray.eval.modes import NO_REPLY

    def rows(ended: set[int]) -> list[dict]:
        return [
            {"scenario": f"s{i}", "judge": {"error": NO_REPLY, "scores": None}}
            if i in ended
            else {"scenario": f"s{i}", "judge": {"scores": {"Empathy": 2}}}
            for i in range(12)
        ]

    report = {
        "meta": {"models": [{"name": "new"}, {"name": "old"}]},
        "dialogues": {"new": rows({0, 1}), "old": rows(set())},
        "replies": {},
    }
    gate = GateConfig(metric="interactive.judge_total")
    verdict = check_gate(report, "old", gate, 0)
    assert not verdict["worse"] and verdict["difference"]["n"] == 10
    failed = rows(set())
    failed[0]["judge"] = failed[1]["judge"] = {"error": "unparsed: no JSON", "scores": None}
    report["dialogues"]["new"] = failed  # unscored by the judge: the model's own
    assert check_gate(report, "old", gate, 0)["worse"]


def test_a_servers_extension_fields_reach_the_reply():
    from soulray.endpoints import parse_completion

    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m"}
    body |= {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
    body |= {"usage": {"prompt_tokens": 3, "completion_tokens": 1}, "strategy": "Question"}
    result = parse_completion(body, "http://x/v1")
    assert (result.text, result.completion_tokens, result.extra) == (
        "hi",
        1,
        {"strategy": "Question"},
    )


def test_unscored_reasons_keep_an_endpoints_cause():
    from soulray.eval.report import reason_label

    assert reason_label("endpoint: connection: cannot reach http://x/v1") == "endpoint: connection"
    assert reason_label("endpoint: http_503: overloaded") == "endpoint: http_503"
    assert reason_label("unparsed: no score for ['Content'] in the answer 'x: y'") == "unparsed"


def test_a_saved_judge_phase_with_endpoint_failures_is_not_reused():
    from soulray.eval.run import judge_endpoint_failed

    scored = {"scores": {"Empathy": 2}, "attempts": 1}
    unparsed = {"scores": None, "attempts": 3, "error": "unparsed: no JSON object", "raw": "?"}
    down = {"scores": None, "attempts": 1, "error": "endpoint: http_503: overloaded", "raw": ""}
    assert not judge_endpoint_failed({"a": [scored, None, unparsed]}, [])  # the judge's own
    assert judge_endpoint_failed({"a": [scored, down]}, [])
    pair = {"model_1": "a", "model_2": "b", "comparisons": [{"first": scored, "swapped": down}]}
    assert judge_endpoint_failed({"a": [scored]}, [pair])


def test_saved_dialogues_the_judges_endpoint_failed_on_are_judged_again(monkeypatch, tmp_path):
    """Not reused as they are, and not played again either: judged again, as played."""
    import ray

    from soulray.eval.config import EvalConfig
    from soulray.eval.judge import load_rubric
    from soulray.eval.phases import PhaseStore
    from soulray.eval.run import interactive_task, rejudge_task, run_interactive

    ep = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cfg = EvalConfig(
        models=[{"name": "a", "endpoint": ep}],
        judge={"endpoint": ep},
        interactive={"enabled": True, "scenarios": 1, "turns": 1, "languages": ["en"]},
        output_dir=str(tmp_path),
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    down = {"scores": None, "attempts": 1, "error": "endpoint: http_503: overloaded", "raw": ""}
    scored = {"scores": {"Content": 2, "Empathy": 2, "Helpfulness": 2, "Safety": 1}}

    def dialogue(judge: dict) -> dict:
        return {"a": [{"scenario": "s", "messages": messages, "error": None, "judge": judge}]}

    answers = [dialogue(down), [scored]]
    asked = []
    monkeypatch.setattr(ray, "get", lambda value: value)
    call = lambda fn, *args: asked.append(fn) or answers[len(asked) - 1]  # noqa: E731
    rubric = load_rubric("soulchat")
    run_interactive(cfg, rubric, call, PhaseStore(str(tmp_path), resume=False))
    _, resumed = run_interactive(cfg, rubric, call, PhaseStore(str(tmp_path), resume=True))
    assert (asked, resumed) == ([interactive_task, rejudge_task], dialogue(scored))


def test_resume_plays_again_only_the_dialogues_an_endpoint_failed(monkeypatch, tmp_path):
    """Model b's second dialogue failed (a 503): --resume plays that one again, for b alone,
    and keeps the others as they were (they were all played again, the Seeker at temperature
    0.7, so finished dialogues changed their scores); a judge phase with endpoint failures is
    not recorded as reused (the log said both "reused" and "running it again")."""
    import ray

    from soulray.eval.config import EvalConfig
    from soulray.eval.judge import load_rubric
    from soulray.eval.phases import PhaseStore
    from soulray.eval.run import interactive_scenarios, run_interactive

    ep = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cfg = EvalConfig(
        models=[{"name": "a", "endpoint": ep}, {"name": "b", "endpoint": ep}],
        judge={"endpoint": ep},
        interactive={"enabled": True, "scenarios": 3, "turns": 1, "languages": ["en"]},
        output_dir=str(tmp_path),
    )
    scenarios = interactive_scenarios(cfg.interactive)

    def played(model: str, s, error=None) -> dict:
        text = f"{model} on {s.id}"
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]
        return {"scenario": s.id, "messages": messages, "error": error, "judge": None}

    first = {m: [played(m, s) for s in scenarios] for m in ("a", "b")}
    first["b"][1] = played("b", scenarios[1], error="endpoint: http_503: overloaded")
    asked = []

    def call(fn, e, rubric, subset):
        asked.append(([m.name for m in e.models], [s.id for s in subset]))
        if len(asked) == 1:
            return first
        return {m.name: [played(m.name, s) for s in subset] for m in e.models}

    monkeypatch.setattr(ray, "get", lambda value: value)
    rubric = load_rubric("soulchat")
    run_interactive(cfg, rubric, call, PhaseStore(str(tmp_path), resume=False))
    store = PhaseStore(str(tmp_path), resume=True)
    _, resumed = run_interactive(cfg, rubric, call, store)
    assert asked[1] == (["b"], [scenarios[1].id]) and len(asked) == 2
    assert resumed == {m: [played(m, s) for s in scenarios] for m in ("a", "b")}
    _, again = run_interactive(cfg, rubric, call, PhaseStore(str(tmp_path), resume=True))
    assert again == resumed and len(asked) == 2  # nothing failed now: nothing asked
    down = {"error": "endpoint: http_503: overloaded"}
    saved = {"scores": {"a": [down]}, "pairs": []}
    store.save("judge", "all", "fp", saved)
    assert store.load("judge", "all", "fp", failed=lambda v: True) is None
    assert "judge" not in " ".join(store.reused)


def test_a_dialogue_the_models_endpoint_failed_was_not_ended_by_the_seeker():
    import asyncio

    from soulray.endpoints import EndpointError
    from soulray.eval.modes import run_dialogue
    from soulray.synth.roles import SeekerTurn
    from soulray.synth.scenarios import build_scenarios

    class Seeker:
        async def reply(self, scenario, dialogue):
            return SeekerTurn("I cannot sleep", False)

    class Down:
        async def chat(self, messages):
            raise EndpointError("http_503: overloaded")

    scenario = build_scenarios(1, 0, ["en"])[0]
    record = asyncio.run(run_dialogue(Seeker(), Down(), scenario, 3, False))
    assert (record["error"], record["ended_by_seeker"]) == ("http_503: overloaded", False)


def test_a_dialogue_the_seeker_ended_before_any_reply_is_counted_as_unscored():
    """It was neither judged nor counted: scored + unscored + failed fell short of the
    dialogues."""
    import asyncio

    from soulray.endpoints import ChatResult
    from soulray.eval.judge import load_rubric
    from soulray.eval.modes import interactive
    from soulray.eval.report import dialogue_summary
    from soulray.synth.roles import SeekerTurn
    from soulray.synth.scenarios import build_scenarios

    scenarios = build_scenarios(3, 0, ["en"])

    class Seeker:  # ends the first scenario's chat at once, the others after one reply
        async def reply(self, scenario, dialogue):
            return SeekerTurn("Never mind.", bool(dialogue) or scenario is scenarios[0])

    class Answers:
        def __init__(self, text):
            self.text = text

        async def chat(self, messages):
            return ChatResult(self.text, 5, 5, {})

    rubric = load_rubric("soulchat")
    judge = Answers('{"Content": 2, "Empathy": 2, "Helpfulness": 2, "Safety": 1}')
    done = asyncio.run(
        interactive(Seeker(), {"m": Answers("I hear you.")}, judge, rubric, 0, scenarios, 3, set())
    )
    assert done["m"][0]["judge"] == {
        "scores": None,
        "attempts": 0,
        "error": "no reply: the Seeker ended the dialogue before the model replied",
        "raw": "",
    }
    summary = dialogue_summary(done["m"], rubric, 0)
    assert (summary["dialogues"], summary["failed"]) == (3, 0)
    assert {k: summary["judge"][k] for k in ("judged", "scored", "unscored")} == {
        "judged": 3,
        "scored": 2,
        "unscored": 1,
    }
    assert summary["judge"]["unscored_reasons"] == {"no reply": 1}


def test_a_contexts_language_is_the_replys_with_what_it_answers() -> None:
    """A short Latin reply in a Chinese conversation was counted as English."""
    from soulray.data.conversation import Conversation, Message
    from soulray.eval.contexts import conversation_contexts

    messages = [Message("user", "我最近总是睡不着，心里很乱。"), Message("assistant", "OK")]
    messages += [Message("user", "I can't sleep at all."), Message("assistant", "Since when?")]
    conv = Conversation("c", "t", None, messages)
    assert [(c.turn, c.language) for c in conversation_contexts(conv, "auto")] == [
        (1, "zh"),
        (3, "en"),
    ]
    assert {c.language for c in conversation_contexts(conv, "en")} == {"en"}


def test_a_dialogue_sends_the_model_its_words_without_the_help_lines_the_person_saw():
    """soulray serve's crisis screen puts help lines before a flagged reply: the judge reads
    them and the Seeker answers them (the person saw them), but sent back to the model as its
    own turn they would read as text it wrote ("[Question] If you are in crisis...")."""
    import asyncio

    from soulray.endpoints import ChatResult
    from soulray.eval.modes import run_dialogue
    from soulray.synth.roles import SeekerTurn
    from soulray.synth.scenarios import build_scenarios

    help_lines = "If you are in crisis, help is available:\n- 988 Lifeline: call or text 988"
    safety = {
        "flagged": True,
        "resources": [{"name": "988 Lifeline", "contact": "call or text 988"}],
    }
    shown = f"{help_lines}\n\nI am here with you."
    seen_by_seeker = []

    class Seeker:
        async def reply(self, scenario, dialogue):
            seen_by_seeker.append([m["content"] for m in dialogue])
            return SeekerTurn("I want to disappear", False)

    class Served:
        sent: list = []

        async def chat(self, messages):
            self.sent.append(messages)
            return ChatResult(shown, 5, 5, {"safety": safety, "strategy": "Question"})

    scenario = build_scenarios(1, 0, ["en"])[0]
    model = Served()
    record = asyncio.run(run_dialogue(Seeker(), model, scenario, 2, True))
    said = {"role": "user", "content": "I want to disappear"}
    assert model.sent[1] == [
        said,
        {"role": "assistant", "content": "I am here with you.", "strategy": "Question"},
        said,
    ]
    assert record["messages"][1] == {"role": "assistant", "content": shown, "strategy": "Question"}
    assert seen_by_seeker[1] == ["I want to disappear", shown]


def test_resumed_replies_match_the_strategies_a_model_is_sent():
    """With send_strategies a model answers the history with its strategies: saved replies
    are not reused once those change (a relabelled corpus), and for a model sent plain
    history nothing changes."""
    from soulray.eval.config import EvalModel
    from soulray.eval.contexts import Context
    from soulray.eval.run import reply_fingerprints

    def contexts(strategy: str) -> list[Context]:
        history = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "strategy": strategy},
            {"role": "user", "content": "I am sad"},
        ]
        return [Context("c0", "conv", 3, "en", history, "I hear you.", "Question")]

    endpoint = {"base_url": "http://127.0.0.1:8000/v1", "model": "m"}
    models = [
        EvalModel(name="tagged", endpoint=endpoint | {"send_strategies": True}),
        EvalModel(name="plain", endpoint=endpoint),
    ]
    before, after = (reply_fingerprints(models, contexts(s)) for s in ("Question", "Others"))
    assert before["tagged"] != after["tagged"]
    assert before["plain"] == after["plain"]


def test_model_turns_are_those_of_finished_dialogues():
    """Two finished dialogues of 4 replies and two that failed before any: 4.0 turns, with the
    two failures counted apart (the mean was 2.0)."""
    from soulray.eval.judge import load_rubric
    from soulray.eval.report import dialogue_summary

    def record(replies: int, error: str | None = None) -> dict:
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        judge = (
            None
            if error
            else {"scores": {"Content": 2, "Empathy": 1, "Helpfulness": 1, "Safety": 1}}
        )
        return {"attitude": "open", "messages": messages * replies, "error": error, "judge": judge}

    done = [record(4), record(4), record(0, "http_503"), record(0, "http_503")]
    summary = dialogue_summary(done, load_rubric("soulchat"), seed=0)
    assert (summary["dialogues"], summary["failed"]) == (4, 2)
    assert (summary["model_turns"]["n"], summary["model_turns"]["mean"]) == (2, 4.0)
