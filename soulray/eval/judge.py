"""The judge: a rubric (YAML data), the prompts it is asked with, and the asking itself.

Every answer is parsed by `answers.py`; an unusable one is sent back once per retry with the
reason ("no score for ['Safety']"), and after the retries the sample is recorded as unscored
with that reason, so the report counts it instead of silently dropping it. Pairwise comparisons
are asked in both orders and only agreement beyond a tie counts as a win (position bias cancels).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soulray.config import parse_setting_yaml
from soulray.eval.answers import AnswerError, Dimension, Verdict, parse_scores, parse_verdict

Outcome = Literal["win", "tie", "loss"]
BUILTIN_RUBRICS = ("soulchat", "cpsycoune")
SPEAKERS = {"user": "Seeker", "assistant": "Supporter"}


class RubricDimension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    min: int = 0
    max: int = Field(ge=1)
    description: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check_range(self) -> RubricDimension:
        if self.min >= self.max:
            raise ValueError(f"dimension {self.name}: min {self.min} must be below max {self.max}")
        return self


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    title: str
    dimensions: list[RubricDimension] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_names(self) -> Rubric:
        """Names are matched in the judge's answer ignoring case, so "A" and "a" would be
        one dimension scored twice."""
        names = [d.name.strip().lower() for d in self.dimensions]
        twice = sorted({d.name for d in self.dimensions if names.count(d.name.strip().lower()) > 1})
        if twice:
            raise ValueError(f"dimension names must differ (ignoring case): {twice}")
        if "total" in names:  # the report's sum of the dimensions is named so
            raise ValueError("a dimension may not be named 'total': the report's sum is")
        return self

    @property
    def dims(self) -> list[Dimension]:
        return [Dimension(d.name, d.min, d.max) for d in self.dimensions]

    @property
    def max_total(self) -> int:
        return sum(d.max for d in self.dimensions)


def load_rubric(name_or_path: str) -> Rubric:
    """A built-in rubric by name (soulchat, cpsycoune) or a YAML file of the same shape."""
    if name_or_path in BUILTIN_RUBRICS:
        text = resources.files("soulray.eval").joinpath(f"rubrics/{name_or_path}.yaml").read_text()
        origin = f"built-in rubric {name_or_path}"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"eval.judge.rubric {name_or_path!r} is neither a built-in rubric "
                f"({', '.join(BUILTIN_RUBRICS)}) nor a YAML file; see soulray/eval/rubrics/"
            )
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        return Rubric.model_validate(parse_setting_yaml("eval.judge.rubric", origin, text))
    except ValidationError as e:  # one line per the CLI's errors, not pydantic's block
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'the file'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"rubric {origin} is invalid: {problems}") from None


@cache
def load_prompts() -> dict[str, str]:
    text = resources.files("soulray.eval").joinpath("prompts.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def format_dialogue(messages: list[dict[str, str]]) -> str:
    """Messages as the judge reads them: 'Seeker: ...' / 'Supporter: ...' (system left out)."""
    lines = [f"{SPEAKERS[m['role']]}: {m['content']}" for m in messages if m["role"] in SPEAKERS]
    return "\n".join(lines)


def rubric_fields(rubric: Rubric) -> dict[str, str]:
    lines = [f"- {d.name} ({d.min}-{d.max}): {d.description}" for d in rubric.dimensions]
    schema = {d.name: {"score": f"<{d.min}-{d.max}>", "reason": "..."} for d in rubric.dimensions}
    return {
        "title": rubric.title,
        "rubric": "\n".join(lines),
        "schema": json.dumps(schema, ensure_ascii=False),
    }


def build_request(kind: str, rubric: Rubric, **fields: str) -> list[dict[str, str]]:
    """The judge's messages for `kind` (turn, dialogue, pairwise) from prompts.yaml."""
    prompts = load_prompts()
    user = string.Template(prompts[kind]).substitute(rubric_fields(rubric) | fields)
    return [{"role": "system", "content": prompts["system"]}, {"role": "user", "content": user}]


@dataclass
class Judgement:
    """One judged item: scores (None when unscored) or the reason it stayed unscored."""

    scores: dict[str, int] | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    verdict: Verdict | None = None
    error: str | None = None
    attempts: int = 0
    raw: str = ""  # the last answer, kept (truncated) for unscored items

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scores": self.scores, "attempts": self.attempts}
        out |= {"reasons": self.reasons} if self.scores or self.verdict else {}
        out |= {"verdict": self.verdict} if self.verdict else {}
        out |= {"error": self.error, "raw": self.raw[:500]} if self.error else {}
        return out


async def ask(client: Any, request: list[dict[str, str]], parse: Any, retries: int) -> Judgement:
    """Ask, parse with `parse(text)`; on an unusable answer send it back with the reason."""
    from soulray.endpoints import EndpointError

    messages, result = list(request), Judgement()
    for attempt in range(retries + 1):
        result.attempts = attempt + 1
        try:
            answer = (await client.chat(messages)).text
        except EndpointError as e:
            result.error = f"endpoint: {e.reason}"
            return result
        try:
            return parse(answer, result)
        except AnswerError as e:
            problem = str(e)
            result.error, result.raw = f"unparsed: {problem}", answer
        retry = string.Template(load_prompts()["retry"]).substitute(error=problem)
        messages = [*request, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": retry})
    return result


async def judge_scores(
    client: Any, request: list[dict[str, str]], rubric: Rubric, retries: int
) -> Judgement:
    def parse(text: str, result: Judgement) -> Judgement:
        result.scores, result.reasons = parse_scores(text, rubric.dims)
        result.error, result.raw = None, ""
        return result

    return await ask(client, request, parse, retries)


async def judge_verdict(client: Any, request: list[dict[str, str]], retries: int) -> Judgement:
    def parse(text: str, result: Judgement) -> Judgement:
        result.verdict, reason = parse_verdict(text)
        result.reasons = {"verdict": reason}
        result.error, result.raw = None, ""
        return result

    return await ask(client, request, parse, retries)


def combine(first: Verdict | None, swapped: Verdict | None) -> Outcome | None:
    """Model 1's outcome from two verdicts: `first` with model 1 as reply A, `swapped` with
    model 1 as reply B. A judge that always prefers one position gets a tie."""
    if first is None or swapped is None:
        return None
    points = {"A": 1.0, "tie": 0.5, "B": 0.0}[first] + {"A": 0.0, "tie": 0.5, "B": 1.0}[swapped]
    return "win" if points > 1 else "loss" if points < 1 else "tie"


async def judge_pair(
    client: Any,
    rubric: Rubric,
    context: list[dict[str, str]],
    reply_1: str,
    reply_2: str,
    retries: int,
) -> dict[str, Any]:
    """Both orders asked; returns the two judgements and model 1's outcome (None: unscored)."""
    ctx = format_dialogue(context)
    first = build_request("pairwise", rubric, context=ctx, reply_a=reply_1, reply_b=reply_2)
    swapped = build_request("pairwise", rubric, context=ctx, reply_a=reply_2, reply_b=reply_1)
    a = await judge_verdict(client, first, retries)
    b = await judge_verdict(client, swapped, retries)
    return {"first": a.to_json(), "swapped": b.to_json(), "outcome": combine(a.verdict, b.verdict)}
