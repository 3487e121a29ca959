"""How streamed text is cut into messages: the coalescing interval, fixed or following the
replica's load (serve.engine.stream_max_messages_per_s). No Ray."""

from __future__ import annotations

import asyncio

from soulray.serve.engine import HFEngine, coalesce
from soulray.serve.generate import Delta


def test_coalescing_follows_an_interval_that_changes():
    """The interval is asked anew at every delta: short while it is 0, merged once it grows."""
    asked: list[int] = []

    def interval() -> float:
        asked.append(1)
        return 0.0 if len(asked) <= 2 else 10.0

    async def deltas():
        for i in range(6):
            yield Delta(f"t{i} ", i + 1, "stop" if i == 5 else None)

    async def collect():
        return [d async for d in coalesce(deltas(), interval)]

    assert asyncio.run(collect()) == [
        Delta("t0 ", 1),
        Delta("t1 ", 2),
        Delta("t2 ", 3),
        Delta("t3 t4 t5 ", 6, "stop"),
    ]


def test_the_stream_interval_stretches_with_live_rows(tiny_export):
    """16 live streams under a 100 messages/s budget: one message per stream every 0.16 s;
    few streams keep serve.engine.stream_interval_s; no budget, always the interval."""
    engine = HFEngine({"stream_interval_s": 0.05}, str(tiny_export))
    rows = {"n": 0}
    engine.scheduler.live_rows = lambda: rows["n"]  # type: ignore[method-assign]
    expected = {0: 0.05, 2: 0.05, 5: 0.05, 16: 0.16, 64: 0.64}
    for n, seconds in expected.items():
        rows["n"] = n
        assert abs(engine.stream_interval() - seconds) < 1e-9, n
    free = HFEngine(
        {"stream_interval_s": 0.05, "stream_max_messages_per_s": None}, str(tiny_export)
    )
    free.scheduler.live_rows = lambda: 64  # type: ignore[method-assign]
    assert free.stream_interval() == 0.05
