"""Screen many messages or model replies at once, in two processes (the suite's two CPUs): each
builds the shipped screen (build_screen(SafetyConfig())) and runs the same `assess` (or
`check_reply`) on one text at a time, so the results are those of one screen, in half the time
of one process."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from soulray.config import SafetyConfig
from soulray.safety.screen import Screen, assess, build_screen, check_reply
from soulray.safety.train import _die_with_parent

_SCREEN: Screen | None = None
Screened = dict[str, tuple[bool, tuple[str, ...]]]


def _start() -> None:
    global _SCREEN
    _die_with_parent()  # a worker ends with the process that screens, however that one ends
    _SCREEN = build_screen(SafetyConfig())


def _assess(text: str) -> tuple[bool, tuple[str, ...]]:
    assert _SCREEN is not None
    a = assess(_SCREEN, [text])
    return a.flagged, a.categories


CRISIS = "I don't want to live anymore."  # the user message before a reply "in crisis"


def _replaced(reply: str) -> tuple[tuple[bool, tuple[str, ...]], ...]:
    """The reply screened after "hi", then after CRISIS (the second reuses the first's cached
    window scores: only the reply head's threshold differs)."""
    assert _SCREEN is not None
    out = []
    for said in ("hi", CRISIS):
        a = check_reply(_SCREEN, reply, assess(_SCREEN, [said]), [said])
        out.append((a.flagged, a.categories))
    return tuple(out)


def _screen_all(fn, texts: list[str], jobs: int) -> dict[str, Any]:
    unique = list(dict.fromkeys(texts))
    # spawn, not fork: the parent may hold the embedding engine's OpenMP runtime already
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_start) as pool:
        return dict(zip(unique, pool.map(fn, unique, chunksize=32), strict=True))


def assess_all(texts: list[str], jobs: int = 2) -> Screened:
    """{text: (flagged, categories)} for every message of `texts`, each screened alone."""
    return _screen_all(_assess, texts, jobs)


def check_replies(replies: list[str], jobs: int = 2) -> dict[str, Screened]:
    """{"hi": {reply: (replaced, categories)}, "crisis": {...}}: every model reply screened
    (check_reply) after the user's "hi", and after CRISIS (the reply head's lower threshold)."""
    both = _screen_all(_replaced, replies, jobs)
    return {ctx: {t: r[i] for t, r in both.items()} for i, ctx in enumerate(("hi", "crisis"))}


def regression_texts() -> tuple[list[str], list[str]]:
    """(every message of test_safety_regression's sets, every reply of test_safety_screen's)."""
    from test_safety_regression import SETS
    from test_safety_screen import REPLY_SETS, reply_set

    messages = [m for crisis, ordinary in SETS.values() for m in (*crisis, *ordinary)]
    return messages, [i["text"] for name in sorted(REPLY_SETS) for i in reply_set(name)]


def screen_regression_sets(out: Path) -> None:
    """What the two regression fixtures screen, to `out` as JSON: tests/conftest.py runs this in
    a child process at nice 19 as the session starts (soulray_testing.screen_in_background), so
    the fixtures find it done instead of spending ~3 minutes of the suite's wall time on it."""
    messages, replies = regression_texts()
    found = {"messages": assess_all(messages)}
    found |= {f"replies_{ctx}": got for ctx, got in check_replies(replies).items()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(found, ensure_ascii=False))
    tmp.rename(out)


def screened_in_background(*kinds: str) -> dict[str, Screened] | None:
    """The background screening's results of these kinds ("messages", "replies_hi",
    "replies_crisis"), once it is done; None when none runs in this session (a worker of
    pytest-xdist, or it failed: the caller screens)."""
    from soulray_testing import background_screening

    out = background_screening()
    if out is None:
        return None
    found = json.loads(out.read_text("utf-8"))
    return {
        kind: {text: (flagged, tuple(cats)) for text, (flagged, cats) in found[kind].items()}
        for kind in kinds
    }


if __name__ == "__main__":
    _die_with_parent()  # the background screening ends with pytest, however pytest ends
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    screen_regression_sets(Path(sys.argv[1]))
