"""The crisis screen's hooks in a chat completion: per-category counters, and the guard that
screens the model's reply (whole, or sentence by sentence while it streams) and replaces a
flagged one with the fixed safe reply. Message text never reaches the counters or the logs."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ray.serve.metrics import Counter

from soulray.safety.screen import Assessment, Screen, check_reply, fixed_reply

_BOUNDARY = re.compile(r"[.!?。！？…\n]")
HOLD_CHARS = 160  # a stream without sentence ends is screened at least this often
Runner = Callable[..., Awaitable[Any]]


class SafetyCounters:
    """soulray_safety_flagged_total / soulray_safety_reply_replaced_total, tag = category; the
    counts are also kept here (a replica's own view, for tests and debugging)."""

    def __init__(self) -> None:
        self.flagged = Counter(
            "soulray_safety_flagged", "requests the crisis screen flagged", ("category",)
        )
        self.replaced = Counter(
            "soulray_safety_reply_replaced",
            "model replies the crisis screen replaced with the safe reply",
            ("category",),
        )
        self.counts: dict[str, int] = {}

    def record(self, a: Assessment, kind: str) -> None:
        for category in a.categories:
            (self.flagged if kind == "flagged" else self.replaced).inc(tags={"category": category})
            key = f"{kind}:{category}"
            self.counts[key] = self.counts.get(key, 0) + 1


@dataclass(slots=True)
class ReplyGuard:
    """Holds streamed text back, screens the reply so far at each sentence end, and sends a
    sentence only once the one after it has been screened with it: a method detail that only
    the next sentence completes ("Here is how. The amount is 40 tablets. Swallow them with
    vodka ...") flags before the sentences it completes were sent. Once the screen flags the
    reply, the rest of the model's text is dropped and the fixed safe reply is sent instead
    (replaced_by records the replacement then, even if the client hangs up after it)."""

    screen: Screen
    user: Assessment
    user_texts: list[str]
    # the help lines were sent before the model's text (a flagged user's stream): the
    # replacement is then the fixed reply alone, not its help lines a second time
    help_shown: bool = False
    replaced_by: Callable[[Assessment], None] | None = None
    sent: str = ""
    pending: str = ""
    screened: int = 0  # characters at the start of `pending` screened already (held back)
    replaced: Assessment | None = field(default=None)

    async def push(self, text: str, final: bool, run: Runner) -> str:
        """The text to send now (may be empty). `run(fn, *args)` runs the screen (off the
        event loop in a replica: IngressState.off_loop)."""
        if self.replaced is not None:
            return ""
        if not (self.screen.cfg.enabled and self.screen.cfg.screen_reply):
            return text  # nothing screens the reply: hold nothing back
        self.pending += text
        cut = self._cut(final)
        if cut == 0:
            return ""
        args = (self.screen, self.sent + self.pending[:cut], self.user, self.user_texts)
        found = await run(check_reply, *args)
        if found.flagged:
            self.replaced = found
            if self.replaced_by is not None:
                self.replaced_by(found)
            fixed = fixed_reply(self.screen, found, help_lines=not self.help_shown)
            return ("\n\n" if self.sent else "") + fixed
        release = cut if final else self._release(cut)
        out, self.pending = self.pending[:release], self.pending[release:]
        self.screened = cut - release
        self.sent += out
        return out

    def _cut(self, final: bool) -> int:
        """Where to screen up to: everything at the end; else the last sentence end past what
        was screened, or all of it once HOLD_CHARS more arrived without one; 0: not yet."""
        if final:
            return len(self.pending)
        ends = [e.end() for e in _BOUNDARY.finditer(self.pending, self.screened)]
        if ends:
            return ends[-1]
        return len(self.pending) if len(self.pending) - self.screened >= HOLD_CHARS else 0

    def _release(self, cut: int) -> int:
        """What to send of the screened text: all but its last sentence (at most HOLD_CHARS of
        it), which waits to be screened with the next."""
        starts = [e.end() for e in _BOUNDARY.finditer(self.pending, 0, cut) if e.end() < cut]
        return max(starts[-1] if starts else 0, cut - HOLD_CHARS)
