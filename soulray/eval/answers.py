"""Reading a judge's answer: JSON that may be fenced, wrapped in prose, cut off, or broken.

The objects are found by soulray.json_objects (strict to lenient), and finally by a per-key
regex. Whatever is found is then validated against the rubric: a missing or out-of-range score
is an `AnswerError` (the caller retries, then records the sample as unscored).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from soulray.json_objects import THINK, load_objects

Verdict = Literal["A", "B", "tie"]

# `Name: 2`, `'Name': 2`, `"Name"：2` or `"Name": {"score": 2` (format in the escaped name), and
# the markdown a judge may answer in instead: `**Name**: 2`, `__Name__: 2`, `- **Name:** 2`
KEY_SCORE = (  # the key as a name of its own: "Emotional Safety: 0" is no Safety score
    r"(?<!\w)(?<![^\W\d_][ \t])[\"'*_]*{key}[\"'*_]*\s*[:：=][\s*_]*"
    r"\{{?\s*(?:[\"']score[\"']\s*:\s*)?(-?\d+(?:\.\d+)?)"
)
WINNERS: dict[str, Verdict] = {
    "a": "A",
    "reply a": "A",
    "b": "B",
    "reply b": "B",
    "tie": "tie",
    "equal": "tie",
    "same": "tie",
    "none": "tie",
}


class AnswerError(ValueError):
    """The judge's answer holds no usable verdict; the message says what was wrong."""


@dataclass(frozen=True)
class Dimension:
    name: str
    min: int
    max: int


def _lookup(obj: dict[str, Any], name: str) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    return lowered.get(name.lower())


def _score_and_reason(obj: dict[str, Any], name: str) -> tuple[Any, str]:
    """A dimension's entry as {"score", "reason"}, a bare number, or under scores/reasons."""
    entry = _lookup(obj, name)
    if isinstance(entry, dict):
        return _lookup(entry, "score"), str(_lookup(entry, "reason") or "")
    if entry is not None:
        return entry, ""
    scores, reasons = _lookup(obj, "scores"), _lookup(obj, "reasons")
    score = _lookup(scores, name) if isinstance(scores, dict) else None
    reason = _lookup(reasons, name) if isinstance(reasons, dict) else None
    return score, str(reason or "")


# a reason's text, closed or cut off by the end of the answer
REASON_TEXT = re.compile(r'("reason"\s*:\s*")((?:[^"\\]|\\.)*)')


def _regex_scores(text: str, dims: list[Dimension]) -> dict[str, tuple[Any, str]]:
    """Last resort on text that is not JSON: `"Name": 2` or `"Name": {"score": 2, ...`. Never
    inside a reason: "Safety: 0 risk here" in another dimension's reason is no Safety score."""
    # reasons blanked to spaces, so a match's offsets are the answer's own
    blanked = REASON_TEXT.sub(lambda m: m.group(1) + " " * len(m.group(2)), text)
    found = {}
    for d in dims:
        m = re.search(KEY_SCORE.format(key=re.escape(d.name)), blanked, re.I)
        if m:
            tail = text[m.end() : m.end() + 400]
            reason = re.match(r'\s*,\s*"reason"\s*:\s*"((?:[^"\\]|\\.)*)', tail)
            found[d.name] = (m.group(1), reason.group(1) if reason else "")
    return found


def _usable(value: Any, d: Dimension) -> bool:
    try:
        as_score(value, d)
    except AnswerError:
        return False
    return True


def as_score(value: Any, d: Dimension) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AnswerError(f"{d.name}: score {value!r} is not a number") from None
    if not number.is_integer() or not d.min <= number <= d.max:
        raise AnswerError(f"{d.name}: score {value!r} is not an integer in {d.min}-{d.max}")
    return int(number)


def parse_scores(text: str, dims: list[Dimension]) -> tuple[dict[str, int], dict[str, str]]:
    """Scores and reasons for every dimension, or AnswerError naming what is missing/invalid."""
    objects = load_objects(text)
    entries: dict[str, tuple[Any, str]] = {}
    rank = (0, 0)
    for obj in objects:  # the first object with the most usable scores, then the most entries
        found = {d.name: _score_and_reason(obj, d.name) for d in dims}
        found = {k: v for k, v in found.items() if v[0] is not None}
        valid = sum(_usable(found[d.name][0], d) for d in dims if d.name in found)
        if (valid, len(found)) > rank:  # an echoed schema ("<0-2>" everywhere) loses
            entries, rank = found, (valid, len(found))
    if len(entries) < len(dims):  # e.g. the outer braces missing: `"Content": {...}, ...`
        # it fills the dimensions the JSON lacks, and never overwrites one the JSON gave
        entries = _regex_scores(THINK.sub("", text), dims) | entries
    missing = [d.name for d in dims if d.name not in entries]
    if missing:
        what = "no JSON object" if not objects and not entries else f"no score for {missing}"
        raise AnswerError(f"{what} in the answer {text[:120]!r}")
    scores = {d.name: as_score(entries[d.name][0], d) for d in dims}
    return scores, {d.name: entries[d.name][1] for d in dims}


def parse_verdict(text: str) -> tuple[Verdict, str]:
    """A pairwise answer: {"winner": "A" | "B" | "tie", "reason": ...}."""
    # the first object naming a winner: an echoed schema ({"winner": "A|B|tie"}) or another
    # object in the prose may come before the answer
    for obj in load_objects(text):
        verdict = _winner(_lookup(obj, "winner"))
        if verdict is not None:
            return verdict, str(_lookup(obj, "reason") or "")
    # `winner: B`, also in markdown (`**Winner:** B`) and ended by a full stop (`winner: A.`)
    # a full stop may end the verdict and a reason follow on the line (`**Winner:** A. B was ...`)
    pattern = (
        r'[*_"]*winner[*_"]*\s*[:：=]\s*[*_"]*([A-Za-z ]+?)[*_"]*'
        r'(?:[.。][*_"]*(?=\s|$)|[*_"]*\s*(?:[,}\n]|$))'
    )
    for m in re.finditer(pattern, text, re.I):
        verdict = _winner(m.group(1))
        if verdict is not None:
            return verdict, ""
    raise AnswerError(f"no winner A, B or tie in the answer {text[:120]!r}")


def _winner(raw: Any) -> Verdict | None:
    """A winner as written, also with a full stop or markdown around it ("A.", "**B**")."""
    return WINNERS.get(str(raw).strip(" *_.。").lower()) if raw is not None else None
