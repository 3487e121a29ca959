"""Continuous batching in-process: late requests join the running batch, outputs unchanged."""

from __future__ import annotations

import asyncio

from soulray.serve.generate import GenRequest, eos_ids, generate_text
from soulray.serve.scheduler import Scheduler


def prompt(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(rendered, add_special_tokens=False).input_ids


async def collect(queue: asyncio.Queue, n: int) -> list[str]:
    texts = [""] * n
    while (item := await queue.get()) is not None:
        for i, delta in enumerate(item):
            texts[i] += delta.text if delta is not None else ""
    return texts


def test_late_groups_join_the_running_batch(tiny_model):
    model, tok, device = tiny_model
    reqs = [
        GenRequest(str(i), prompt(tok, f"message number {i} " * (i + 1)), 12 + i, 0.7, 0.9, i)
        for i in range(6)
    ]

    async def go():
        sched = Scheduler(model, tok, eos_ids(model, tok), device, max_rows=8)
        first = asyncio.ensure_future(collect(sched.submit(reqs[:2]), 2))
        await asyncio.sleep(0.05)  # the first group is decoding by now
        second = asyncio.ensure_future(collect(sched.submit(reqs[2:5]), 3))
        third = asyncio.ensure_future(collect(sched.submit(reqs[5:]), 1))
        out = await first + await second + await third
        sched.task.cancel()
        return out, sched.step_sizes

    texts, steps = asyncio.run(go())
    assert texts == [generate_text(model, tok, r, device).text for r in reqs]
    assert max(steps) > 2  # later groups decoded in the same forward passes as the first


def test_batch_limit_makes_groups_wait(tiny_model):
    model, tok, device = tiny_model
    reqs = [GenRequest(str(i), prompt(tok, "hi"), 5, 0.0, 1.0) for i in range(3)]

    async def go():
        sched = Scheduler(model, tok, eos_ids(model, tok), device, max_rows=1)
        outs = await asyncio.gather(*(collect(sched.submit([r]), 1) for r in reqs))
        sched.task.cancel()
        return outs, sched.step_sizes

    outs, steps = asyncio.run(go())
    assert len(outs) == 3 and set(steps) == {1}  # one at a time: never more than one row
