"""One role-play dialogue: the Seeker opens, then Counselor -> Supporter -> Seeker until the
Seeker ends it (once `min_turns` Supporter replies are in) or `max_turns` is reached.

Quality rules applied while it runs: an empty, repeated or wrong-language utterance ends the
dialogue there when it already has `min_turns` replies, and drops it otherwise (so a written
dialogue never contains one). The reason is counted either way. Backend failures are not
handled here: an `EndpointError` propagates and fails the scenario in the caller.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from soulray.synth.config import LoopConfig, QualityConfig
from soulray.synth.roles import Counselor, Seeker, Supporter
from soulray.synth.scenarios import Scenario
from soulray.text import CJK, detect_language

PUNCT = re.compile(r"[\W_]+", re.UNICODE)


@dataclass
class Dialogue:
    status: Literal["ok", "dropped"]
    reason: str  # ok: how it stopped (seeker_ended, max_turns, ended_<rule>); dropped: why
    messages: list[dict[str, Any]] = field(default_factory=list)  # with strategy on replies
    counts: Counter[str] = field(default_factory=Counter)  # counselor answers, rules met
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


@dataclass
class Cast:
    seeker: Seeker
    counselor: Counselor
    supporter: Supporter


def utterance_problem(
    text: str, role: str, earlier: list[dict[str, Any]], language: str, check_language: bool
) -> str | None:
    """Which quality rule an utterance breaks (`empty`, `repeated`, `wrong_language`), if any."""
    if not text.strip():
        return "empty"
    key = normalize_utterance(text)
    if any(m["role"] == role and normalize_utterance(m["content"]) == key for m in earlier):
        return "repeated"
    # "……", "？？？" or an emoji is in no language, and "OK" or "emmm" from a Chinese Seeker is
    # too short to tell: a terse Seeker, not a wrong one
    if check_language and judged_language(text) and detect_language(text) != language:
        return "wrong_language"
    return None


def judged_language(text: str) -> bool:
    """Whether an utterance says enough to tell its language: two Chinese characters ("我睡不着"
    is a sentence), or eight letters of other scripts ("OK", "emmm" are not)."""
    chinese = len(CJK.findall(text))
    return chinese >= 2 or sum(c.isalpha() for c in text) - chinese >= 8


def normalize_utterance(text: str) -> str:
    """Lowercase, without punctuation or spaces: "I see." and "i see" are one utterance. Text of
    punctuation or emoji alone is kept as it is ("……" and "？？？" are two)."""
    return PUNCT.sub("", text.lower()) or text.strip()


async def run_dialogue(
    scenario: Scenario, cast: Cast, loop: LoopConfig, quality: QualityConfig
) -> Dialogue:
    """Play one scenario to the end; raises EndpointError when a backend fails for good."""
    out = Dialogue("ok", "")
    speaker = {"user": "seeker", "assistant": "supporter"}
    while True:
        turn = await cast.seeker.reply(scenario, plain(out.messages))
        out.prompt_tokens += turn.prompt_tokens
        out.completion_tokens += turn.completion_tokens
        may_stop = out.turns >= loop.min_turns
        if turn.wants_to_stop and not turn.text:  # a bare end marker: nothing more to say
            if may_stop:
                return finish(out, "seeker_ended")
            return finish_or_drop(out, "seeker_ended_early", False)  # too short to keep
        problem = check(turn.text, "user", out, scenario, quality)
        if problem:
            return finish_or_drop(out, f"{problem}_{speaker['user']}", may_stop)
        out.messages.append({"role": "user", "content": turn.text})
        if turn.wants_to_stop and may_stop:
            return finish(out, "seeker_ended")
        problem = await supporter_turn(scenario, cast, out, quality)
        if problem:
            return finish_or_drop(out, f"{problem}_{speaker['assistant']}", may_stop)
        if out.turns >= loop.max_turns:
            return finish(out, "max_turns")


async def supporter_turn(
    scenario: Scenario, cast: Cast, out: Dialogue, quality: QualityConfig
) -> str | None:
    """Counselor picks a strategy, Supporter replies; returns the rule the reply broke."""
    choice = await cast.counselor.choose(scenario, plain(out.messages))
    out.counts.update(f"counselor_{reason}" for reason in choice.failures)
    out.counts["counselor_fallback"] += choice.fallback
    out.counts["counselor_retried_ok"] += bool(choice.failures) and not choice.fallback
    reply = await cast.supporter.reply(scenario, plain(out.messages), choice.strategy)
    out.prompt_tokens += choice.prompt_tokens + reply.prompt_tokens
    out.completion_tokens += choice.completion_tokens + reply.completion_tokens
    problem = check(reply.text, "assistant", out, scenario, quality)
    if problem is None:
        stage = cast.counselor.taxonomy.stage_of(choice.strategy)
        out.messages.append(
            {
                "role": "assistant",
                "content": reply.text,
                "strategy": choice.strategy,
                "rationale": choice.rationale,
                "stage": stage,
            }
        )
    return problem


def check(text: str, role: str, out: Dialogue, scenario: Scenario, q: QualityConfig) -> str | None:
    return utterance_problem(text, role, out.messages, scenario.language, q.check_language)


def finish(out: Dialogue, reason: str) -> Dialogue:
    out.reason = reason
    return out


def finish_or_drop(out: Dialogue, rule: str, may_stop: bool) -> Dialogue:
    """A broken rule ends a dialogue that is long enough, and drops one that is not."""
    out.counts[rule] += 1
    if may_stop:
        return finish(out, f"ended_{rule}")
    out.status = "dropped"
    return finish(out, rule)


def plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The dialogue as the roles see it: role and content only."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]
