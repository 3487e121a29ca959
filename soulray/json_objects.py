"""The JSON objects in a language model's answer: fenced, wrapped in prose, cut off, or several.

Models wrap JSON in ```json fences, think aloud first, echo the schema they were shown before
their answer, run out of tokens mid-way, or forget a quote. Eval's judge and synth's Counselor
both read answers this one way, strict to lenient: the whole text, each fenced block, the first
balanced {...}, the text from the first '{' with its open strings and brackets closed, then
each later balanced {...}; the caller keeps the first object that is a valid answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)


def json_candidates(text: str, complete_only: bool = False) -> list[str]:
    """Substrings worth handing to json.loads, strictest first; `complete_only` leaves out an
    answer cut off mid-way, completed (whose last value may be cut short)."""
    text = THINK.sub("", text).strip()
    found = [text, *(m.group(1).strip() for m in FENCE.finditer(text))]
    start = text.find("{")
    if start >= 0:
        balanced = balanced_object(text, start)
        found += [balanced] if balanced else []
        found += [] if complete_only else [close_truncated(text[start:])]
        # later objects too: an example object in the prose may come before the answer
        at = start + len(balanced) if balanced else len(text)
        while (start := text.find("{", at)) >= 0:
            later = balanced_object(text, start)
            found += [later] if later else []
            at = start + len(later) if later else len(text)
    return found


def balanced_object(text: str, start: int) -> str | None:
    """The {...} starting at `start` up to its matching brace (strings respected), if closed."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped = c == "\\" and not escaped
            in_string = not (c == '"' and not escaped)
            continue
        if c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def close_truncated(text: str) -> str:
    """An answer cut off mid-way, completed: the open string ended, a dangling key or comma
    dropped, and the open brackets closed in order."""
    stack: list[str] = []
    in_string, escaped = False, False
    for c in text:
        if in_string:
            escaped = c == "\\" and not escaped
            in_string = not (c == '"' and not escaped)
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    fixed = text + ('"' if in_string else "")
    # a trailing `, "key"` or `"key":` or `,` cannot stand before a closing bracket
    fixed = re.sub(r'(,\s*"[^"]*"\s*:?\s*|,\s*|"[^"]*"\s*:\s*)$', "", fixed.rstrip())
    return fixed + "".join(reversed(stack))


def load_objects(text: str, complete_only: bool = False) -> list[dict[str, Any]]:
    """Every JSON object json_candidates finds, strictest first."""
    out = []
    for candidate in json_candidates(text, complete_only):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
