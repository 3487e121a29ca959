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
    """Holds streamed text back to the next sentence end, screens the reply so far, and lets it
    through; once the screen flags it, the rest of the model's text is dropped and the fixed safe
    reply is sent instead (nothing flagged was ever sent)."""

    screen: Screen
    user: Assessment
    user_texts: list[str]
    sent: str = ""
    pending: str = ""
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
            return ("\n\n" if self.sent else "") + fixed_reply(self.screen, found)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.sent += out
        return out

    def _cut(self, final: bool) -> int:
        if final or len(self.pending) >= HOLD_CHARS:
            return len(self.pending)
        ends = list(_BOUNDARY.finditer(self.pending))
        return ends[-1].end() if ends else 0
