"""Canned Seeker / Counselor / Supporter answers for ScriptedOpenAI, told apart by their system
prompt. Each answer is derived from the request, so dialogues differ by scenario (no near
duplicates) and a test can predict every turn exactly."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scripted_openai import Reply

PLAN = (
    "Question",
    "Reflection of feelings",
    "Affirmation and Reassurance",
    "Providing Suggestions",
)
SITUATION = re.compile(r"(?:What is going on \(.*?\): |发生了什么（.*?）：)(.*?)[.。]\n")
PERSONA = re.compile(
    r"(?:Who you are: |你是谁：)(.*?)\n(?:.*\n)?(?:How you feel: |你的感受：)(.*?)\n"
)
STRATEGY = re.compile(r"(?:Strategy for this reply: |这一句回复的策略：)(.*?) ?[(（]")


def role_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"]
    if system.startswith(("You are role-playing", "你在扮演")):
        return "seeker"
    if system.startswith(("You are a Strategy Counselor", "你是一名策略顾问")):
        return "counselor"
    return "supporter"


def seeker_text(situation: str, n: int, zh: bool) -> str:
    return f"第{n}句：{situation}" if zh else f"message {n}: {situation}"


def supporter_text(first: str, k: int, strategy: str, zh: bool) -> str:
    return (
        f"第{k}句回应（{strategy}）：我在听，{first}" if zh else f"reply {k} ({strategy}): {first}"
    )


@dataclass
class ScriptedRoles:
    """stop_after: the Seeker's message that carries <END>; plan: strategy of reply k (cycled);
    counselor: optional override (k, attempt) -> raw answer for odd Counselor behaviour."""

    stop_after: int = 3
    with_persona: bool = False  # Seeker lines also name the persona (more distinct dialogues)
    plan: tuple[str, ...] = PLAN
    counselor: Callable[[int, int], str | None] | None = None
    calls: dict[str, int] = field(
        default_factory=lambda: {"seeker": 0, "counselor": 0, "supporter": 0}
    )

    def __call__(self, body: dict[str, Any]) -> str | Reply:
        role = role_of(body)
        self.calls[role] += 1
        answer = {
            "seeker": self.seeker,
            "counselor": self.counselor_answer,
            "supporter": self.supporter,
        }[role]
        return answer(body["messages"])

    def seeker(self, messages: list[dict[str, str]]) -> str:
        system = messages[0]["content"]
        zh = system.startswith("你")
        n = 1 + sum(m["role"] == "assistant" for m in messages)  # its own turns, flipped
        text = seeker_text(SITUATION.search(system).group(1), n, zh)
        if self.with_persona:
            text += " (" + "; ".join(PERSONA.search(system).groups()) + ")"
        return text + (" <END>" if n >= self.stop_after else "")

    def counselor_answer(self, messages: list[dict[str, str]]) -> str:
        transcript = messages[1]["content"]
        k = 1 + transcript.count("\nSupporter: ") + transcript.count("\n倾听者: ")
        attempt = (len(messages) - 2) // 2  # each retry adds the answer and a correction
        custom = self.counselor(k, attempt) if self.counselor else None
        if custom is not None:
            return custom
        strategy = self.plan[(k - 1) % len(self.plan)]
        return json.dumps({"strategy": strategy, "rationale": f"turn {k}"})

    def supporter(self, messages: list[dict[str, str]]) -> str:
        system = messages[0]["content"]
        strategy = STRATEGY.search(system).group(1)
        k = 1 + sum(m["role"] == "assistant" for m in messages[1:])
        first = messages[1]["content"]
        return supporter_text(first, k, strategy, system.startswith("你"))
