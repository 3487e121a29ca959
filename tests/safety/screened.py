"""Screen many messages or model replies at once, in two processes (the suite's two CPUs): each
builds the shipped screen (build_screen(SafetyConfig())) and runs the same `assess` (or
`check_reply`) on one text at a time, so the results are those of one screen, in half the time
of one process."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from soulray.config import SafetyConfig
from soulray.safety.screen import Screen, assess, build_screen, check_reply

_SCREEN: Screen | None = None


def _start() -> None:
    global _SCREEN
    _SCREEN = build_screen(SafetyConfig())


def _assess(text: str) -> tuple[bool, tuple[str, ...]]:
    assert _SCREEN is not None
    a = assess(_SCREEN, [text])
    return a.flagged, a.categories


def _replaced(reply: str) -> tuple[bool, tuple[str, ...]]:
    assert _SCREEN is not None
    a = check_reply(_SCREEN, reply, assess(_SCREEN, ["hi"]), ["hi"])
    return a.flagged, a.categories


def _screen_all(fn, texts: list[str], jobs: int) -> dict[str, tuple[bool, tuple[str, ...]]]:
    unique = list(dict.fromkeys(texts))
    # spawn, not fork: the parent may hold the embedding engine's OpenMP runtime already
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_start) as pool:
        return dict(zip(unique, pool.map(fn, unique, chunksize=32), strict=True))


def assess_all(texts: list[str], jobs: int = 2) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """{text: (flagged, categories)} for every message of `texts`, each screened alone."""
    return _screen_all(_assess, texts, jobs)


def check_replies(replies: list[str], jobs: int = 2) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """{reply: (replaced, categories)} for every model reply, each screened after the user's
    "hi" (check_reply)."""
    return _screen_all(_replaced, replies, jobs)
