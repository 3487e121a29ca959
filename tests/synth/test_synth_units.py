"""Synth parts on exact values: scenarios, prompts, Counselor answers, taxonomy, stop rules
(over real HTTP to a scripted server, no Ray), output format, resume bookkeeping, dedup."""

from __future__ import annotations

import asyncio
import json
import random
import shlex
from dataclasses import dataclass
from typing import Any

import pytest
from scripted_openai import ScriptedOpenAI
from synth_script import ScriptedRoles

from soulray.config import ESCONV_STRATEGIES, load_config
from soulray.data.conversation import CleanStats, build_strategy_lookup, normalize_strategy
from soulray.endpoints import EndpointConfig
from soulray.synth.config import LoopConfig, QualityConfig, SynthConfig
from soulray.synth.job import build_cast, to_record
from soulray.synth.near_dupes import NearDuplicateIndex
from soulray.synth.output import OutputStore
from soulray.synth.report import build_report
from soulray.synth.roleplay import run_dialogue, utterance_problem
from soulray.synth.roles import (
    counselor_messages,
    load_prompts,
    render_seeker_system,
    seeker_messages,
    split_end_marker,
    supporter_messages,
)
from soulray.synth.scenarios import (
    build_scenarios,
    load_pool,
    make_scenario,
    pool_size,
    scenario_from_record,
)
from soulray.synth.strategies import (
    CounselorAnswerError,
    load_taxonomy,
    parse_counselor_answer,
)

EN = make_scenario(
    language="en",
    age=28,
    occupation="nurse",
    personality="quiet and guarded",
    problem_type="job crisis",
    emotion="anxiety",
    intensity=4,
    situation="was laid off last month and has not told anyone yet",
    attitude="resistant",
)
ZH = make_scenario(
    language="zh",
    age=19,
    occupation="大学生",
    personality="内向又爱自责",
    problem_type="学业压力",
    emotion="焦虑",
    intensity=2,
    situation="一场重要考试没考过，这周末要告诉家里",
    attitude="open",
)


def test_scenarios_are_distinct_deterministic_and_plentiful() -> None:
    pool = load_pool()
    assert pool_size(pool, "en") >= 5000 and pool_size(pool, "zh") >= 5000
    first = build_scenarios(3000, seed=7, languages=["zh", "en"])
    assert len({s.id for s in first}) == 3000
    assert [s.language for s in first[:4]] == ["zh", "en", "zh", "en"]
    assert build_scenarios(3000, seed=7, languages=["zh", "en"]) == first
    assert build_scenarios(5, seed=8, languages=["en"])[0] != first[1]
    with pytest.raises(
        ValueError, match=r"scenarios.yaml has no \['fr'\] section for synth.scenarios.languages"
    ):
        build_scenarios(1, 0, ["fr"])


def test_a_small_language_pool_is_refused_not_drawn_forever() -> None:
    """Languages take turns: 40 scenarios over [zh, en] need 20 zh ones, and a zh pool of 15
    used to loop for ever however big the en pool was. An entry listed twice makes none."""
    one = {"ages": [30, 30], "occupations": ["t"], "personalities": ["p"], "emotions": ["e"]}
    zh = one | {"problems": [{"type": "a", "situations": ["s", "s"]}]}
    en = one | {"ages": [30, 40], "problems": [{"type": "a", "situations": ["s", "u"]}]}
    pool = {"zh": zh, "en": en}
    assert (pool_size(pool, "zh"), pool_size(pool, "en")) == (15, 60)
    with pytest.raises(ValueError, match=r"^asked for 40 scenarios, 20 of them zh .* only 15;"):
        build_scenarios(40, 0, ["zh", "en"], pool)
    assert len({s.id for s in build_scenarios(30, 0, ["zh", "en"], pool)}) == 30
    # a language listed twice takes both its places' shares: 14 + 13 zh of 40
    with pytest.raises(ValueError, match=r"^asked for 40 scenarios, 27 of them zh .* only 15;"):
        build_scenarios(40, 0, ["zh", "zh", "en"], pool)


def test_a_failure_a_later_run_made_good_leaves_failed_jsonl(tmp_path) -> None:
    """failed.jsonl lists what is still failed: a scenario a resumed run made is taken out of
    it (a user counting its lines was misled), the rest stay with their latest reason."""
    store = OutputStore(str(tmp_path))
    store.write_failed("s1", "http_503: busy")
    store.write_failed("s2", "timeout: 120 s")
    store.write_failed("s2", "http_503: busy")
    store.close()
    store = OutputStore(str(tmp_path))
    store.write_dialogue({"id": "s1", "messages": []})
    store.close()
    state = OutputStore(str(tmp_path)).load()
    assert state.failed == {"s2": "http_503: busy"}
    lines = (tmp_path / "_synth" / "failed.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"id": "s2", "reason": "timeout: 120 s"},
        {"id": "s2", "reason": "http_503: busy"},
    ]
    assert sorted(p.name for p in (tmp_path / "_synth").iterdir()) == ["failed.jsonl"]


def test_scenario_from_an_esconv_record() -> None:
    import random

    record = {
        "situation": "My boyfriend broke up with me after four years.",
        "problem_type": "breakup with partner",
        "emotion_type": "sadness",
        "survey_score": {"seeker": {"initial_emotion_intensity": "5"}},
        "dialog": [],
    }
    s = scenario_from_record(record, load_pool(), random.Random(0))
    assert (s.language, s.problem_type, s.emotion, s.intensity, s.situation) == (
        "en",
        "breakup with partner",
        "sadness",
        5,
        "My boyfriend broke up with me after four years.",
    )
    assert scenario_from_record({"dialog": []}, load_pool(), random.Random(0)) is None


def test_seeker_prompt_renders_the_scenario_and_flips_roles() -> None:
    prompts = load_prompts()
    dialogue = [
        {"role": "user", "content": "hey"},
        {"role": "assistant", "content": "hi, I'm here"},
    ]
    messages = seeker_messages(prompts, EN, dialogue)
    system = messages[0]["content"]
    assert "Who you are: a 28-year-old nurse; personality: quiet and guarded.\n" in system
    assert (
        "What is going on (job crisis): was laid off last month and has not told anyone yet.\n"
        in system
    )
    assert "How you feel: anxiety, very strong (4/5).\n" in system
    assert "Your attitude towards help: You doubt anyone can help" in system
    assert messages[1:] == [
        {
            "role": "user",
            "content": "(You open the chat. Write your first message to the supporter.)",
        },
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "hi, I'm here"},
    ]
    zh = seeker_messages(prompts, ZH, [])[0]["content"]
    assert "你是谁：19岁的大学生，性格内向又爱自责。\n" in zh
    assert "你的感受：焦虑，程度明显（2/5）。\n" in zh


def test_counselor_and_supporter_prompts() -> None:
    prompts, taxonomy = load_prompts(), load_taxonomy()
    dialogue = [
        {"role": "user", "content": "I lost my job"},
        {"role": "assistant", "content": "Oh no"},
    ]
    system, user = counselor_messages(prompts, taxonomy, "en", dialogue)
    assert "- Question: Ask open or specific questions" in system["content"]
    assert "[exploration]\n- Restatement or Paraphrasing:" in system["content"]
    assert system["content"].endswith(
        'Answer with JSON only: {"strategy": "<a name from the list>", '
        '"rationale": "<one sentence>"}'
    )
    assert user["content"] == (
        "Dialogue so far:\nSeeker: I lost my job\nSupporter: Oh no\n\n"
        "Choose the strategy for the Supporter's next reply."
    )
    sup = supporter_messages(prompts, taxonomy, "zh", "Information", dialogue)
    assert (
        "这一句回复的策略：Information（提供有用的事实、资源或视角，比如这种经历有多普遍。）"
        in (sup[0]["content"])
    )
    assert sup[1:] == dialogue


@pytest.mark.parametrize(
    ("answer", "strategy", "rationale"),
    [
        ('{"strategy": "Question", "rationale": "learn more"}', "Question", "learn more"),
        (
            '```json\n{"strategy": "reflection of feelings", "rationale": "x"}\n```',
            "Reflection of feelings",
            "x",
        ),
        ('Sure! {"strategy": "[Suggestions]"} hope that helps', "Providing Suggestions", ""),
        (
            '{"strategy": "Approval and Reassurance", "rationale": 3}',
            "Affirmation and Reassurance",
            "",
        ),
        (  # the schema echoed, then the answer
            '{"strategy": "<one of the names>", "rationale": "<one line>"}\n'
            '{"strategy": "Question", "rationale": "learn more"}',
            "Question",
            "learn more",
        ),
        (
            '<think>{"x": 1}</think>Answer: {"strategy": "Self-disclosure"} (not {this})',
            "Self-disclosure",
            "",
        ),
    ],
)
def test_counselor_answers_that_parse(answer: str, strategy: str, rationale: str) -> None:
    choice = parse_counselor_answer(answer, load_taxonomy())
    assert (choice.strategy, choice.rationale) == (strategy, rationale)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I would ask a question.", "invalid_json"),
        ('{"strategy": "Question", "rationale": ', "invalid_json"),
        ('{"rationale": "no name"}', "invalid_json"),
        ('["Question"]', "invalid_json"),
        ('{"strategy": "Hypnosis", "rationale": "x"}', "unknown_strategy"),
        ('{"strategy": "<name>"} {"strategy": "Hypnosis"}', "unknown_strategy"),
    ],
)
def test_counselor_answers_that_do_not(answer: str, reason: str) -> None:
    with pytest.raises(CounselorAnswerError) as err:
        parse_counselor_answer(answer, load_taxonomy())
    assert err.value.reason == reason


def test_taxonomy_is_the_one_prepare_normalises_onto() -> None:
    taxonomy = load_taxonomy()
    assert taxonomy.names == ESCONV_STRATEGIES
    assert taxonomy.fallback == load_config().data.strategies.fallback
    lookup = build_strategy_lookup(load_config().data.strategies)
    stats = CleanStats()
    assert [
        normalize_strategy(n, lookup, "Others", stats) for n in taxonomy.names
    ] == taxonomy.names
    assert stats.unknown_strategies == {}
    assert [taxonomy.stage_of(n) for n in ("Question", "Providing Suggestions", "Others")] == [
        "exploration",
        "action",
        "exploration",
    ]


def test_a_taxonomy_file_of_another_shape_is_refused_naming_the_file_and_field(tmp_path) -> None:
    from soulray.synth.strategies import build_taxonomy

    one = {"name": "Probe", "stages": ["exploration"], "en": "Ask.", "zh": "问。"}
    cases = [
        ([one], "expected a mapping with a `strategies:` list"),
        ({"strategies": [{k: v for k, v in one.items() if k != "stages"}]}, "needs `stages:`"),
        ({"strategies": [one | {"stages": "exploration"}]}, "needs `stages:` as a list"),
        ({"strategies": [one | {"zh": ""}]}, "definition under both `en:` and `zh:`"),
        ({"strategies": [one, one | {"name": "probe"}]}, r"must differ \(ignoring case\)"),
        ({"strategies": [one]}, r"`fallback: Others` is not one of its strategies \['Probe'\]"),
        ({"strategies": [one], "fallback": "Probe", "aliases": {"Ask": "Nope"}}, "`aliases:`"),
    ]
    for data, says in cases:
        with pytest.raises(ValueError, match=f"^taxonomy tax.yaml: .*{says}"):
            build_taxonomy(data, "tax.yaml")
    ok = build_taxonomy({"strategies": [one], "fallback": "Probe"}, "tax.yaml")
    assert (ok.names, ok.fallback) == (["Probe"], "Probe")
    custom = tmp_path / "tax.yaml"
    names = ["Probe", "Small Step", "Yes", "Self-disclosure: brief"]  # YAML would misread two
    custom.write_text(
        json.dumps({"strategies": [one | {"name": n} for n in names], "fallback": "Probe"})
    )
    from soulray.cli import taxonomy_overrides

    cfg = load_config(None, [f"synth.taxonomy_file={custom}"])
    printed = taxonomy_overrides(cfg)  # synth's `next:` line: what prepare needs to keep them
    kept = load_config(None, shlex.split(printed))  # as the shell hands them to prepare
    assert kept.data.strategies.taxonomy == names
    assert (kept.data.strategies.fallback, kept.data.strategies.aliases) == ("Probe", {})


def test_end_marker_and_utterance_rules() -> None:
    assert split_end_marker("ok thanks, bye <END>") == ("ok thanks, bye", True)
    assert split_end_marker("谢谢你【结束】") == ("谢谢你", True)
    assert split_end_marker("[end]") == ("", True)
    assert split_end_marker("not yet") == ("not yet", False)
    earlier = [{"role": "user", "content": "I can't sleep."}]
    assert utterance_problem("  ", "user", earlier, "en", True) == "empty"
    assert utterance_problem("i cant sleep", "user", earlier, "en", True) == "repeated"
    assert utterance_problem("I can't sleep.", "assistant", earlier, "en", True) is None
    assert utterance_problem("我睡不着", "user", earlier, "en", True) == "wrong_language"
    assert utterance_problem("我睡不着", "user", earlier, "en", False) is None
    assert utterance_problem("\u3400\u4db5", "user", earlier, "zh", True) is None  # Extension A
    for terse in ("……", "？？？", "😢", "..."):  # no words: a terse Seeker, in any language
        assert utterance_problem(terse, "user", earlier, "zh", True) is None
        assert utterance_problem(terse, "user", earlier, "en", True) is None
    # too short to tell its language: "OK" or "emmm" from a Chinese Seeker is no wrong language
    for short in ("OK", "emmm", "ok好"):
        assert utterance_problem(short, "user", [], "zh", True) is None
    assert utterance_problem("I really cannot sleep", "user", [], "zh", True) == "wrong_language"
    # punctuation or emoji alone are not one repeated utterance: "？？？" after "……" is new
    said = [{"role": "user", "content": "……"}]
    assert utterance_problem("？？？", "user", said, "zh", True) is None
    assert utterance_problem("😢", "user", said, "zh", True) is None
    assert utterance_problem("……", "user", said, "zh", True) == "repeated"


def play(roles: ScriptedRoles, scenario, loop: LoopConfig, **quality):
    with ScriptedOpenAI(roles) as server:
        sc = SynthConfig.model_validate(
            {"roles": {"seeker": {"base_url": server.url, "model": "m"}}, "loop": loop.model_dump()}
        )

        async def go():
            cast = build_cast(sc)
            try:
                return await run_dialogue(scenario, cast, loop, QualityConfig(**quality))
            finally:
                await cast.seeker.client.aclose()

        return asyncio.run(go())


def test_seeker_ends_it_after_the_minimum_and_strategies_land_on_replies() -> None:
    d = play(ScriptedRoles(stop_after=3), EN, LoopConfig(min_turns=2, max_turns=6))
    situation = EN.situation
    assert (d.status, d.reason, d.turns) == ("ok", "seeker_ended", 2)
    assert [(m["role"], m["content"], m.get("strategy")) for m in d.messages] == [
        ("user", f"message 1: {situation}", None),
        ("assistant", f"reply 1 (Question): message 1: {situation}", "Question"),
        ("user", f"message 2: {situation}", None),
        (
            "assistant",
            f"reply 2 (Reflection of feelings): message 1: {situation}",
            "Reflection of feelings",
        ),
        ("user", f"message 3: {situation}", None),
    ]
    assert [m.get("stage") for m in d.messages[1::2]] == ["exploration", "comforting"]
    assert d.messages[1]["rationale"] == "turn 1"


@dataclass
class BareEndAt(ScriptedRoles):
    """The Seeker's message `at` is the end marker alone."""

    at: int = 2

    def seeker(self, messages: list[dict[str, str]]) -> str:
        n = 1 + sum(m["role"] == "assistant" for m in messages)
        return "<END>" if n == self.at else super().seeker(messages)


def test_a_bare_end_marker_before_the_minimum_drops_it_as_ended_early() -> None:
    """Named for what happened (it used to read `empty_seeker`)."""
    d = play(BareEndAt(stop_after=9), EN, LoopConfig(min_turns=3, max_turns=6))
    assert (d.status, d.reason, d.turns, d.counts["seeker_ended_early"]) == (
        "dropped",
        "seeker_ended_early",
        1,
        1,
    )
    d = play(BareEndAt(stop_after=9, at=3), EN, LoopConfig(min_turns=2, max_turns=6))
    assert (d.status, d.reason, d.turns) == ("ok", "seeker_ended", 2)


def test_a_stop_before_the_minimum_is_ignored_and_max_turns_ends_it() -> None:
    d = play(ScriptedRoles(stop_after=1), ZH, LoopConfig(min_turns=3, max_turns=5))
    # The Seeker asks to stop from its first message on; it may once 3 replies are in.
    assert (d.status, d.reason, d.turns, len(d.messages)) == ("ok", "seeker_ended", 3, 7)
    d = play(ScriptedRoles(stop_after=99), ZH, LoopConfig(min_turns=1, max_turns=2))
    assert (d.status, d.reason, d.turns, d.messages[-1]["role"]) == (
        "ok",
        "max_turns",
        2,
        "assistant",
    )
    assert d.messages[1]["content"].startswith("第1句回应（Question）：我在听，第1句：")


def test_counselor_retry_then_fallback_are_counted() -> None:
    def odd(k: int, attempt: int) -> str | None:
        if k == 1:
            return "not json" if attempt == 0 else None  # fixed by the retry
        return '{"strategy": "Hypnosis"}'  # never fixed: fallback

    d = play(ScriptedRoles(stop_after=3, counselor=odd), EN, LoopConfig(min_turns=2, max_turns=4))
    assert [m["strategy"] for m in d.messages if m["role"] == "assistant"] == ["Question", "Others"]
    assert dict(d.counts) == {
        "counselor_invalid_json": 1,
        "counselor_retried_ok": 1,
        "counselor_unknown_strategy": 3,  # 1 answer + 2 retries at reply 2
        "counselor_fallback": 1,
    }


def test_bad_utterances_drop_a_short_dialogue_and_end_a_long_one() -> None:
    class EmptySecondReply(ScriptedRoles):
        def supporter(self, messages):
            k = 1 + sum(m["role"] == "assistant" for m in messages[1:])
            return "   " if k == self.bad_at else super().supporter(messages)

    roles = EmptySecondReply(stop_after=9)
    roles.bad_at = 2
    d = play(roles, EN, LoopConfig(min_turns=3, max_turns=5))
    assert (d.status, d.reason, d.counts["empty_supporter"]) == ("dropped", "empty_supporter", 1)
    roles = EmptySecondReply(stop_after=9)
    roles.bad_at = 4
    d = play(roles, EN, LoopConfig(min_turns=3, max_turns=5))
    assert (d.status, d.reason, d.turns) == ("ok", "ended_empty_supporter", 3)
    d = play(
        ScriptedRoles(),
        ZH.__class__(**(ZH.to_dict() | {"language": "en"})),
        LoopConfig(min_turns=1, max_turns=3),
    )
    assert (d.status, d.reason) == ("dropped", "wrong_language_seeker")


def test_output_record_is_what_prepare_reads(tmp_path) -> None:
    d = play(ScriptedRoles(stop_after=2), EN, LoopConfig(min_turns=1, max_turns=3))
    sc = SynthConfig.model_validate(
        {
            "roles": {
                "seeker": {"base_url": "http://h/v1", "model": "s"},
                "supporter": {"model": "t"},
            },
            "seed": 5,
        }
    )
    record = to_record(EN, d, sc)
    assert set(record) == {"id", "topic", "messages", "metadata"}
    assert (record["id"], record["topic"]) == (EN.id, "job crisis")
    assert record["messages"][1] == {
        "role": "assistant",
        "content": f"reply 1 (Question): message 1: {EN.situation}",
        "strategy": "Question",
        "rationale": "turn 1",
        "stage": "exploration",
    }
    meta = record["metadata"]
    assert meta["models"] == {"seeker": "s", "counselor": "s", "supporter": "t"}
    assert (meta["seed"], meta["turns"], meta["stop_reason"]) == (5, 1, "seeker_ended")
    assert meta["scenario"] == EN.to_dict()
    from soulray.data.formats import detect_format, to_conversation

    conv = to_conversation(json.loads(json.dumps(record)), detect_format(record), "k")
    assert [(m.role, m.strategy) for m in conv.messages] == [
        ("user", None),
        ("assistant", "Question"),
        ("user", None),
    ]


def test_store_resume_cuts_a_torn_line_and_skips_written_and_dropped(tmp_path) -> None:
    store = OutputStore(str(tmp_path))
    store.write_dialogue({"id": "a", "messages": []})
    store.write_dialogue({"id": "b", "messages": []})
    store.write_dropped("c", "near_duplicate", {})
    store.write_failed("d", "connection: cannot reach x")
    store.write_failed("b", "timeout: x")  # failed once, written later
    store.close()
    shard = tmp_path / "part-00000.jsonl"
    with shard.open("a") as f:
        f.write('{"id": "e", "mess')  # killed mid-write
    state = OutputStore(str(tmp_path)).load()
    assert [r["id"] for r in state.records] == ["a", "b"]
    assert state.finished == {"a", "b", "c"}
    assert state.failed == {"d": "connection: cannot reach x"}
    assert shard.read_text().endswith('"messages": []}\n')
    store = OutputStore(str(tmp_path))
    store.write_dialogue({"id": "f", "messages": []})
    store.close()
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [
        "part-00000.jsonl",
        "part-00001.jsonl",
    ]
    with pytest.raises(ValueError, match="is remote"):
        OutputStore("s3://bucket/synth")


def test_the_report_groups_failures_by_label_not_by_the_servers_message(tmp_path) -> None:
    store = OutputStore(str(tmp_path))
    store.write_failed("a", "http_503: overloaded (request id 1)")
    store.write_failed("b", "http_503: overloaded (request id 2)")
    store.write_failed("c", "timeout: http://x/v1 did not answer in time")
    store.close()
    report = build_report(OutputStore(str(tmp_path)).load(), ["Question"], {})
    assert report["dialogues"] == {
        "written": 0,
        "dropped": {},
        "failed": {"http_503": 2, "timeout": 1},
        "failed_example": {
            "http_503": "http_503: overloaded (request id 2)",
            "timeout": "timeout: http://x/v1 did not answer in time",
        },
    }


def test_a_deleted_shard_leaves_a_gap_not_a_clash_and_home_paths_resolve(
    tmp_path, monkeypatch
) -> None:
    """A user who deletes part-00001 to remake its dialogues: the next run writes part-00003
    (it used to crash with FileExistsError on part-00002 and lose the dialogue it had made)."""
    for i in range(3):
        store = OutputStore(str(tmp_path))
        store.write_dialogue({"id": f"d{i}", "messages": []})
        store.close()
    (tmp_path / "part-00001.jsonl").unlink()
    store = OutputStore(str(tmp_path))
    store.write_dialogue({"id": "d1", "messages": []})
    store.close()
    names = sorted(p.name for p in tmp_path.glob("part-*"))
    assert names == ["part-00000.jsonl", "part-00002.jsonl", "part-00003.jsonl"]
    assert [r["id"] for r in OutputStore(str(tmp_path)).load().records] == ["d0", "d2", "d1"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert OutputStore("~/out").root == tmp_path / "out"  # as prepare reads data.inputs
    assert OutputStore(f"file://{tmp_path}/x").root == tmp_path / "x"


def test_near_duplicates_are_found_and_distinct_texts_kept() -> None:
    index = NearDuplicateIndex(threshold=0.8)
    text = "I failed my exam and my parents will be so angry with me this weekend. " * 3
    assert index.add_if_new("a", text) is None
    assert index.add_if_new("b", text.replace("weekend", "week end")) == "a"
    assert (
        index.add_if_new("c", "My dog died last week and everyone says it was just a pet.") is None
    )
    assert len(index) == 2


def test_a_lower_threshold_gets_more_bands_so_pairs_above_it_are_found() -> None:
    """README: dialogues at or above the threshold are dropped. 16 bands x 4 rows (right for
    0.8) found pairs at J 0.5-0.7 only ~64 % of the time; the shape now follows the threshold."""
    from soulray.synth.near_dupes import jaccard, lsh_shape, shingles

    assert [lsh_shape(t) for t in (0.3, 0.5, 0.8, 0.95)] == [(64, 1), (32, 2), (16, 4), (8, 8)]
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    found = 0
    similar = 0
    for k in range(60):
        base = rng.sample(words, 60)
        other = base[:]
        for i in rng.sample(range(60), 14):  # J 0.53-0.61 (16 x 4 found 49 of these 60)
            other[i] = rng.choice(words)
        a, b = " ".join(base), " ".join(other)
        if jaccard(shingles(a), shingles(b)) < 0.5:
            continue
        similar += 1
        index = NearDuplicateIndex(threshold=0.5)
        index.add_if_new(f"a{k}", a)
        found += index.add_if_new(f"b{k}", b) == f"a{k}"
    assert similar == 60 and found == 60


def test_config_roles_inherit_from_the_seeker() -> None:
    cfg = load_config(None, ["synth.roles.seeker.model=big", "synth.roles.counselor.temperature=0"])
    roles = cfg.synth.roles.resolved
    assert roles["counselor"] == EndpointConfig(
        base_url="http://127.0.0.1:8000/v1", model="big", temperature=0.0
    )
    assert roles["supporter"] == roles["seeker"]
    with pytest.raises(ValueError, match="min_turns=5 exceeds max_turns=2"):
        load_config(None, ["synth.loop.min_turns=5", "synth.loop.max_turns=2"])


def test_a_bad_seeker_value_the_roles_inherit_is_reported_once() -> None:
    with pytest.raises(ValueError) as err:
        load_config(
            None, ["synth.roles.seeker.temperature=5", "synth.roles.supporter.max_tokens=0"]
        )
    assert str(err.value).splitlines()[1:] == [
        "  config key 'synth.roles.seeker.temperature': "
        "Input should be less than or equal to 2 (got 5)",
        "  config key 'synth.roles.supporter.max_tokens': "
        "Input should be greater than or equal to 1 (got 0)",
    ]


def test_a_role_set_to_one_value_is_refused_naming_the_field_to_set() -> None:
    with pytest.raises(ValueError) as err:
        load_config(None, ["synth.roles.seeker=http://x:8000/v1"])
    assert str(err.value).splitlines()[1] == (
        "  config key 'synth.roles': Value error, synth.roles.seeker is a section of endpoint "
        "fields, not one value (got 'http://x:8000/v1'); set one field, e.g. "
        "synth.roles.seeker.base_url=http://host:8000/v1"
    )


def test_scenarios_from_esconv_situations() -> None:
    from soulray_testing import shared_path

    from soulray.synth.job import load_scenarios

    path = shared_path("esconv/FailedESConv.json")
    raw = json.loads(path.read_text())
    situations = list(dict.fromkeys(r["situation"].strip() for r in raw if r.get("situation")))
    sc = SynthConfig.model_validate(
        {"scenarios": {"source": "corpus", "inputs": [str(path)], "count": 0}}
    )
    scenarios = load_scenarios(sc)
    assert len(situations) == 189  # 196 records, 7 repeat a situation
    assert [s.situation for s in scenarios] == situations
    assert scenarios[0].problem_type == raw[0]["problem_type"]
    assert scenarios[0].intensity == int(
        raw[0]["survey_score"]["seeker"]["initial_emotion_intensity"]
    )
    assert {s.language for s in scenarios} == {"en"}
    assert (
        len(
            load_scenarios(
                sc.model_copy(update={"scenarios": sc.scenarios.model_copy(update={"count": 5})})
            )
        )
        == 5
    )
    with pytest.raises(ValueError, match="needs synth.scenarios.inputs"):
        SynthConfig.model_validate({"scenarios": {"source": "corpus"}})


def test_bad_scenario_inputs_and_roles_are_refused_on_the_driver(tmp_path, monkeypatch) -> None:
    """Before any actor starts: an actor that dies on a missing key or file shows only a Ray
    traceback, and a corpus in another language would make a run of nothing."""
    from soulray_testing import shared_path

    from soulray.synth.job import check_cast, load_scenarios

    esconv = str(shared_path("esconv/FailedESConv.json"))  # English situations only
    corpus = {"source": "corpus", "inputs": [esconv], "count": 0}
    with pytest.raises(ValueError, match=r"has a 'situation' text in \['zh'\]"):
        load_scenarios(SynthConfig.model_validate({"scenarios": corpus | {"languages": ["zh"]}}))
    zh_only = tmp_path / "zh.yaml"
    zh_only.write_text(json.dumps({"zh": load_pool()["zh"]}, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"has no \['en'\] section for synth.scenarios.languages"):
        load_scenarios(
            SynthConfig.model_validate({"scenarios": corpus | {"pool_file": str(zh_only)}})
        )
    # called directly (without load_scenarios' check first), the same error, not a KeyError
    from soulray.synth.scenarios import build_scenarios, scenarios_from_corpus

    with pytest.raises(ValueError, match=r"scenarios.yaml has no \['en'\] section"):
        scenarios_from_corpus([esconv], 0, 0, {"zh": load_pool()["zh"]})
    with pytest.raises(ValueError, match=r"scenarios.yaml has no \['en'\] section"):
        build_scenarios(4, 0, ["zh", "en"], {"zh": load_pool()["zh"]})
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="expected a mapping of languages"):
        load_scenarios(SynthConfig.model_validate({"scenarios": {"pool_file": str(empty)}}))
    with pytest.raises(ValueError, match="^synth.scenarios.inputs entry '/nowhere.json' matches"):
        load_scenarios(
            SynthConfig.model_validate({"scenarios": corpus | {"inputs": ["/nowhere.json"]}})
        )

    monkeypatch.delenv("SOULRAY_TEST_NO_KEY", raising=False)
    keyed = {"roles": {"counselor": {"api_key_env": "SOULRAY_TEST_NO_KEY"}}}
    with pytest.raises(ValueError, match="SOULRAY_TEST_NO_KEY is not set"):
        check_cast(SynthConfig.model_validate(keyed))
    with pytest.raises(ValueError, match=r"^synth.taxonomy_file=.*nope.yaml: no such file"):
        check_cast(SynthConfig.model_validate({"taxonomy_file": str(tmp_path / "nope.yaml")}))
    check_cast(SynthConfig())  # the packaged prompts and taxonomy, no key needed
    packaged = load_prompts()
    en_only = tmp_path / "prompts_en.yaml"
    en_only.write_text(json.dumps({"en": packaged["en"]}, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"^synth.prompts_file: no 'zh' section; the run plays"):
        check_cast(SynthConfig.model_validate({"prompts_file": str(en_only)}))
    check_cast(  # English scenarios only: the English section is enough
        SynthConfig.model_validate(
            {"prompts_file": str(en_only), "scenarios": {"languages": ["en"]}}
        )
    )
    lacking = tmp_path / "prompts_lacking.yaml"
    cut = {k: v for k, v in packaged["en"].items() if k != "counselor_retry"}
    lacking.write_text(json.dumps({"en": cut}, ensure_ascii=False))
    with pytest.raises(ValueError, match="the 'en' section lacks counselor_retry$"):
        check_cast(
            SynthConfig.model_validate(
                {"prompts_file": str(lacking), "scenarios": {"languages": ["en"]}}
            )
        )


@pytest.mark.parametrize("key", ["synth.taxonomy_file", "synth.scenarios.pool_file"])
def test_a_missing_settings_file_is_refused_before_ray_starts(tmp_path, key):
    """Found before Ray starts: no Ray session directory is made (it took ~20 s to say)."""
    import os
    import subprocess

    from soulray_testing import ROOT, SOULRAY

    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": str(tmp_path)}
    cmd = [SOULRAY, "synth", "--config", "jobs/synth.yaml", f"{key}=/nope.yaml"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: {key}=/nope.yaml: no such file; give the path of a YAML file of "
        f"the packaged one's shape, or leave {key} unset for the packaged one"
    )
    assert list(tmp_path.iterdir()) == []  # Ray never started


def test_a_prompts_file_the_roles_cannot_fill_is_refused_on_the_driver(tmp_path) -> None:
    """A placeholder typo or a lookup table without a key was a KeyError in every actor, after
    Ray started: the job died with a Ray traceback. It is one error naming the template."""
    from soulray.synth.job import check_cast

    packaged = load_prompts()
    path = tmp_path / "prompts.yaml"

    def refused(**en: Any) -> str:
        path.write_text(json.dumps({"en": packaged["en"] | en}, ensure_ascii=False))
        cfg = {"prompts_file": str(path), "scenarios": {"languages": ["en"]}}
        with pytest.raises(ValueError) as e:
            check_cast(SynthConfig.model_validate(cfg))
        return str(e.value)

    typo = packaged["en"]["seeker_system"].replace("{situation}", "{situaton}")
    assert refused(seeker_system=typo) == (
        "synth.prompts_file: the 'en' seeker_system cannot be filled (KeyError: 'situaton'); "
        "its placeholders are ['age', 'occupation', 'personality', 'problem_type', 'situation', "
        "'emotion', 'intensity', 'intensity_word', 'attitude_text', 'end_marker']"
    )
    assert refused(intensities={"1": "mild"}) == (
        "synth.prompts_file: the 'en' intensities needs the keys [1, 2, 3, 4, 5] "
        "(lacks [2, 3, 4, 5])"
    )
    attribute = packaged["en"]["supporter_system"].replace("{strategy}", "{strategy.name}")
    assert refused(supporter_system=attribute).startswith(
        "synth.prompts_file: the 'en' supporter_system cannot be filled (AttributeError: "
    )  # a traceback before
    assert refused(counselor_user=["Dialogue so far"]) == (
        "synth.prompts_file: the 'en' counselor_user must be text"
    )
    # a JSON file's intensity keys are text ("3"): read as the packaged file's 3
    from_json = json.loads(json.dumps(packaged))
    scenario = build_scenarios(1, 0, ["en"])[0]
    assert render_seeker_system(from_json, scenario) == render_seeker_system(packaged, scenario)
    # the packaged file's literal braces ({{"strategy": ...}}) and an opening line with a brace
    path.write_text(json.dumps({"en": packaged["en"] | {"seeker_start": "({you} open)"}}))
    check_cast(
        SynthConfig.model_validate({"prompts_file": str(path), "scenarios": {"languages": ["en"]}})
    )
