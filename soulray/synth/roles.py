"""The three role-play roles: Seeker, Strategy Counselor and Supporter.

Each role is an endpoint client plus prompt templates (prompts.yaml, per language). A dialogue
is always kept as OpenAI messages from the Supporter's point of view (user = Seeker, assistant
= Supporter), which is the shape written out and the shape eval's models are asked in; the
Seeker sees it with the roles flipped, the Counselor as a transcript.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from soulray.config import parse_setting_yaml, read_setting_file
from soulray.endpoints import ChatResult, EndpointClient, served_words
from soulray.synth.scenarios import ATTITUDES, INTENSITIES, Scenario
from soulray.synth.strategies import (
    CounselorAnswerError,
    Taxonomy,
    parse_counselor_answer,
)

END_MARKER = "<END>"
# The Seeker's way of saying it wants to stop; models also write [END], <end> or 【结束】.
END_PATTERN = re.compile(r"[<\[【]\s*(?:END|结束)\s*[>\]】]", re.IGNORECASE)
Messages = list[dict[str, str]]


def load_prompts(
    path: str | None = None, key: str = "synth.prompts_file"
) -> dict[str, dict[str, Any]]:
    """Language -> templates: the packaged prompts.yaml, or a YAML file of the same shape."""
    if path is None:
        text = resources.files("soulray.synth").joinpath("prompts.yaml").read_text("utf-8")
    else:
        return parse_setting_yaml(key, path, read_setting_file(key, path))
    return yaml.safe_load(text)


SEEKER_PROMPTS: tuple[str, ...] = ("seeker_system", "seeker_start", "attitudes", "intensities")
CAST_PROMPTS = (
    *SEEKER_PROMPTS,
    *("speakers", "counselor_system", "counselor_user", "counselor_retry", "supporter_system"),
)


def check_prompts(
    prompts: Any, languages: list[str], key: str, needed: tuple[str, ...] = CAST_PROMPTS
) -> None:
    """Every language the run plays has every template it uses: a file without one is refused
    here, by name, not by a KeyError in an actor in the middle of the run."""
    if not isinstance(prompts, dict):
        raise ValueError(f"{key}: expected a mapping of language -> templates (see prompts.yaml)")
    for language in languages:
        section = prompts.get(language)
        if not isinstance(section, dict):
            raise ValueError(
                f"{key}: no {language!r} section; the run plays {languages}: add one (see "
                "soulray/synth/prompts.yaml) or leave that language out of the scenarios"
            )
        missing = [name for name in needed if name not in section]
        if missing:
            raise ValueError(f"{key}: the {language!r} section lacks {', '.join(missing)}")
        for name in needed:
            problem = template_problem(name, section[name])
            if problem:
                raise ValueError(f"{key}: the {language!r} {name} {problem}")


# What each template is filled with, and the keys each lookup table needs: a file with a
# placeholder typo or a missing key is refused up front, not by a KeyError in every actor.
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "seeker_system": (
        *("age", "occupation", "personality", "problem_type", "situation", "emotion"),
        *("intensity", "intensity_word", "attitude_text", "end_marker"),
    ),
    "counselor_system": ("strategies",),
    "counselor_user": ("transcript",),
    "counselor_retry": ("problem", "names"),
    "supporter_system": ("strategy", "definition"),
}
TABLE_KEYS: dict[str, tuple[Any, ...]] = {
    "attitudes": ATTITUDES,
    "intensities": INTENSITIES,
    "speakers": ("user", "assistant"),
}


def table_entry(table: dict[Any, Any], key: Any) -> Any:
    """table[key], with an intensity's key also as text: a JSON (or quoted YAML) file's keys
    are "1".."5", the packaged YAML's 1..5."""
    return table.get(key, table.get(str(key)))


def template_problem(name: str, value: Any) -> str | None:
    """Why one entry of a prompts section cannot be used as roles.py uses it, if it cannot."""
    if name in TABLE_KEYS:
        lacking = [
            k
            for k in TABLE_KEYS[name]
            if not isinstance(value, dict) or table_entry(value, k) is None
        ]
        return f"needs the keys {list(TABLE_KEYS[name])} (lacks {lacking})" if lacking else None
    if not isinstance(value, str):
        return "must be text"
    fields = PLACEHOLDERS.get(name)
    if fields is None:  # sent as written (seeker_start)
        return None
    try:
        value.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError, AttributeError) as e:  # {strategy.name}
        return f"cannot be filled ({type(e).__name__}: {e}); its placeholders are {list(fields)}"
    return None


@dataclass
class SeekerTurn:
    text: str
    wants_to_stop: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class CounselorResult:
    strategy: str
    rationale: str
    fallback: bool  # every attempt failed; `strategy` is the taxonomy's fallback
    failures: list[str] = field(default_factory=list)  # reason of each unusable answer
    prompt_tokens: int = 0
    completion_tokens: int = 0


def render_seeker_system(prompts: dict[str, Any], scenario: Scenario) -> str:
    p = prompts[scenario.language]
    return p["seeker_system"].format(
        age=scenario.age,
        occupation=scenario.occupation,
        personality=scenario.personality,
        problem_type=scenario.problem_type,
        situation=scenario.situation.rstrip("。."),
        emotion=scenario.emotion,
        intensity=scenario.intensity,
        intensity_word=table_entry(p["intensities"], scenario.intensity),
        attitude_text=p["attitudes"][scenario.attitude],
        end_marker=END_MARKER,
    )


def seeker_messages(prompts: dict[str, Any], scenario: Scenario, dialogue: Messages) -> Messages:
    """The Seeker's own view: its turns are `assistant`, the Supporter's are `user`, after a
    cue that opens the chat (a chat model must be asked something before it speaks)."""
    flip = {"user": "assistant", "assistant": "user"}
    return [
        {"role": "system", "content": render_seeker_system(prompts, scenario)},
        {"role": "user", "content": prompts[scenario.language]["seeker_start"]},
        *({"role": flip[m["role"]], "content": m["content"]} for m in dialogue),
    ]


def split_end_marker(text: str) -> tuple[str, bool]:
    """The utterance without the stop marker, and whether the marker was there."""
    cleaned = END_PATTERN.sub("", text)
    return cleaned.strip(), cleaned != text


def render_transcript(prompts: dict[str, Any], language: str, dialogue: Messages) -> str:
    speakers = prompts[language]["speakers"]
    return "\n".join(f"{speakers[m['role']]}: {m['content']}" for m in dialogue)


def counselor_messages(
    prompts: dict[str, Any], taxonomy: Taxonomy, language: str, dialogue: Messages
) -> Messages:
    p = prompts[language]
    transcript = render_transcript(prompts, language, dialogue)
    return [
        {
            "role": "system",
            "content": p["counselor_system"].format(strategies=taxonomy.render(language)),
        },
        {"role": "user", "content": p["counselor_user"].format(transcript=transcript)},
    ]


def supporter_messages(
    prompts: dict[str, Any], taxonomy: Taxonomy, language: str, strategy: str, dialogue: Messages
) -> Messages:
    definition = taxonomy.get(strategy).definitions[language]
    system = prompts[language]["supporter_system"].format(strategy=strategy, definition=definition)
    return [{"role": "system", "content": system}, *dialogue]


class Seeker:
    """Plays the person in a scenario; says when it wants to stop (END_MARKER)."""

    def __init__(self, client: EndpointClient, prompts: dict[str, Any]):
        self.client = client
        self.prompts = prompts

    async def reply(self, scenario: Scenario, dialogue: Messages) -> SeekerTurn:
        result = await chat(self.client, seeker_messages(self.prompts, scenario, dialogue))
        text, stop = split_end_marker(result.text)
        return SeekerTurn(text, stop, result.prompt_tokens, result.completion_tokens)


class Counselor:
    """Picks the next strategy; an unusable answer is retried with a correction, then mapped
    to the taxonomy's fallback (both counted by the caller from the result)."""

    def __init__(
        self, client: EndpointClient, prompts: dict[str, Any], taxonomy: Taxonomy, retries: int
    ):
        self.client = client
        self.prompts = prompts
        self.taxonomy = taxonomy
        self.retries = retries

    async def choose(self, scenario: Scenario, dialogue: Messages) -> CounselorResult:
        messages = counselor_messages(self.prompts, self.taxonomy, scenario.language, dialogue)
        out = CounselorResult(self.taxonomy.fallback, "", fallback=True)
        for _ in range(self.retries + 1):
            result = await chat(self.client, messages)
            out.prompt_tokens += result.prompt_tokens
            out.completion_tokens += result.completion_tokens
            try:
                choice = parse_counselor_answer(result.text, self.taxonomy)
            except CounselorAnswerError as e:
                out.failures.append(e.reason)
                messages = [*messages, *self._correction(scenario.language, result, e)]
                continue
            out.strategy, out.rationale, out.fallback = choice.strategy, choice.rationale, False
            break
        return out

    def _correction(self, language: str, result: ChatResult, e: CounselorAnswerError) -> Messages:
        retry = self.prompts[language]["counselor_retry"]
        text = retry.format(problem=e.reason, names=", ".join(self.taxonomy.names))
        return [{"role": "assistant", "content": result.text}, {"role": "user", "content": text}]


class Supporter:
    """Writes the next reply following the chosen strategy."""

    def __init__(self, client: EndpointClient, prompts: dict[str, Any], taxonomy: Taxonomy):
        self.client = client
        self.prompts = prompts
        self.taxonomy = taxonomy

    async def reply(self, scenario: Scenario, dialogue: Messages, strategy: str) -> ChatResult:
        messages = supporter_messages(
            self.prompts, self.taxonomy, scenario.language, strategy, dialogue
        )
        result = await chat(self.client, messages)
        result.text = result.text.strip()
        return result


async def chat(client: EndpointClient, messages: Messages) -> ChatResult:
    """A role's completion with only the model's words: help lines a `soulray serve` backend's
    crisis screen put before them are taken out, a reply it replaced fails the scenario."""
    result = await client.chat(messages)
    result.text = served_words(result, client.cfg.base_url)
    return result


def build_seeker(client: EndpointClient, prompts_path: str | None = None) -> Seeker:
    return Seeker(client, load_prompts(prompts_path))
