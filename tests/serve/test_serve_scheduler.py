"""Continuous batching in-process: late requests join the running batch with outputs unchanged;
the batch's state (KV cache, mask) stays exactly what the live rows need; cancelled, expired and
failed requests leave without touching the others."""

from __future__ import annotations

import asyncio
import time

import pytest

from soulray.serve.generate import GenRequest, eos_ids, generate_text, width
from soulray.serve.scheduler import EngineError, Scheduler


def prompt(tok, text: str) -> list[int]:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(rendered, add_special_tokens=False).input_ids


async def collect(sched: Scheduler, ticket) -> str:
    return "".join([d.text async for d in sched.deltas(ticket)])


def scheduler(tiny_model, max_rows: int, **kwargs) -> Scheduler:
    model, tok, device = tiny_model
    return Scheduler(model, tok, eos_ids(model, tok), device, max_rows=max_rows, **kwargs)


def alone(tiny_model, req: GenRequest) -> str:
    model, tok, device = tiny_model
    return generate_text(model, tok, req, device).text


def test_late_requests_join_the_running_batch(tiny_model):
    _, tok, _ = tiny_model
    reqs = [
        GenRequest(str(i), prompt(tok, f"message number {i} " * (i + 1)), 12 + i, 0.7, 0.9, i)
        for i in range(6)
    ]

    async def go():
        sched = scheduler(tiny_model, 8)
        first = [asyncio.ensure_future(collect(sched, sched.submit(r))) for r in reqs[:2]]
        await asyncio.sleep(0.05)  # the first two are decoding by now
        later = [asyncio.ensure_future(collect(sched, sched.submit(r))) for r in reqs[2:]]
        out = await asyncio.gather(*first, *later)
        sched.task.cancel()
        return out, sched.step_sizes

    texts, steps = asyncio.run(go())
    assert texts == [alone(tiny_model, r) for r in reqs]
    assert max(steps) > 2  # later requests decoded in the same forward passes as the first


def test_batch_limit_makes_requests_wait(tiny_model):
    _, tok, _ = tiny_model
    reqs = [GenRequest(str(i), prompt(tok, f"hi {i}"), 5, 0.0, 1.0) for i in range(3)]

    async def go():
        sched = scheduler(tiny_model, 1)
        outs = await asyncio.gather(*(collect(sched, sched.submit(r)) for r in reqs))
        sched.task.cancel()
        return outs, sched.step_sizes

    outs, steps = asyncio.run(go())
    assert outs == [alone(tiny_model, r) for r in reqs]
    assert [generate_text(*tiny_model[:2], r, tiny_model[2]).tokens for r in reqs] == [5] * 3
    # one at a time: 3 requests x 5 tokens, each token one forward pass of one row
    assert steps == {1: 15}


def test_kv_width_is_what_the_live_requests_need_after_a_long_staggered_run(tiny_model):
    """40 requests of mixed lengths arrive staggered over a batch of 4 rows. After every step
    each live row holds exactly prompt + generated tokens in the cache, and the cache and mask
    are exactly as wide as the longest live row: nothing of the batch's history remains."""
    model, tok, _ = tiny_model
    reqs = [
        GenRequest(str(i), prompt(tok, "word " * (3 + 37 * (i % 3 == 0) + i % 7)), 4 + i % 9, 0, 1)
        for i in range(40)
    ]
    checked: list[tuple[int, int]] = []

    async def go():
        sched = scheduler(tiny_model, 4)

        def check(rows: int, seconds: float) -> None:
            del rows, seconds
            batch = sched.batch
            if not batch.rows:
                return
            need = [len(r.req.prompt_ids) + r.tokens for r in batch.rows]
            held = batch.mask.sum(1).tolist()  # each row: its prompt + its tokens
            kv = {
                n
                for layer in batch.cache.layers
                for n in (layer.keys.shape[2], layer.values.shape[2])
            }
            checked.append((held == need, kv, width(batch), max(need)))

        sched.on_step = check
        tasks = []
        for r in reqs:
            tasks.append(asyncio.ensure_future(collect(sched, sched.submit(r))))
            await asyncio.sleep(0.004)
        out = await asyncio.gather(*tasks)
        sched.task.cancel()
        return out, sched

    texts, sched = asyncio.run(go())
    assert texts == [alone(tiny_model, r) for r in reqs]
    assert len(checked) > 60
    assert all(same and kv == {w} and w == need for same, kv, w, need in checked)
    widths = [w for _, _, w, _ in checked]
    assert any(b < a for a, b in zip(widths, widths[1:], strict=False))  # trimmed as rows left
    assert sched.batch is None and sched.step_sizes.keys() <= {1, 2, 3, 4}


def test_a_cancelled_row_leaves_at_the_next_step(tiny_model):
    _, tok, _ = tiny_model
    reqs = [GenRequest(str(i), prompt(tok, f"hello {i}"), 30, 0.0, 1.0) for i in range(3)]
    sizes: list[int] = []

    async def go():
        sched = scheduler(tiny_model, 4)
        tickets = [sched.submit(r) for r in reqs]
        gone = asyncio.ensure_future(collect(sched, tickets[1]))

        def on_step(rows: int, seconds: float) -> None:
            sizes.append(rows)
            if len(sizes) == 5:
                gone.cancel()  # the client disconnected: its task is cancelled

        sched.on_step = on_step
        kept = await asyncio.gather(collect(sched, tickets[0]), collect(sched, tickets[2]))
        sched.task.cancel()
        return kept, tickets[1]

    kept, cancelled = asyncio.run(go())
    assert sizes[:5] == [3] * 5 and sizes[5:] == [2] * 25  # gone from the very next step
    assert cancelled.cancelled and cancelled.done
    assert kept == [alone(tiny_model, reqs[0]), alone(tiny_model, reqs[2])]


def test_a_failing_prefill_fails_only_the_new_request(tiny_model):
    model, tok, _ = tiny_model
    running = [GenRequest(str(i), prompt(tok, f"steady {i}"), 40, 0.7, 0.9, i) for i in range(2)]
    good = GenRequest("good", prompt(tok, "a new one"), 10, 0.0, 1.0)
    bad = GenRequest("bad", [model.config.vocab_size + 5], 10, 0.0, 1.0)  # id out of range

    async def go():
        sched = scheduler(tiny_model, 8)
        first = [asyncio.ensure_future(collect(sched, sched.submit(r))) for r in running]
        await asyncio.sleep(0.05)  # decoding
        late = [asyncio.ensure_future(collect(sched, sched.submit(r))) for r in (bad, good)]
        out = await asyncio.gather(*first, *late, return_exceptions=True)
        sched.task.cancel()
        return out

    out = asyncio.run(go())
    assert out[:2] == [alone(tiny_model, r) for r in running]
    assert isinstance(out[2], EngineError) and (out[2].status, out[2].code) == (
        500,
        "prefill_failed",
    )
    assert "IndexError" in out[2].message
    assert out[3] == alone(tiny_model, good)


def test_a_request_past_its_deadline_ends_with_a_clear_error(tiny_model):
    _, tok, _ = tiny_model
    slow = GenRequest("slow", prompt(tok, "take your time"), 500, 0.0, 1.0)
    quick = GenRequest("quick", prompt(tok, "hi"), 8, 0.0, 1.0)
    sizes: list[int] = []

    async def go():
        sched = scheduler(tiny_model, 4, timeout_s=30.0)
        tickets = [sched.submit(slow), sched.submit(quick)]
        assert abs(tickets[0].deadline - time.monotonic() - 30.0) < 1.0  # from the config

        def on_step(rows: int, seconds: float) -> None:
            sizes.append(rows)
            if len(sizes) == 3:
                tickets[0].deadline = time.monotonic()  # as if 30 s had passed

        sched.on_step = on_step
        out = await asyncio.gather(*(collect(sched, t) for t in tickets), return_exceptions=True)
        sched.task.cancel()
        return out

    expired, done = asyncio.run(go())
    assert isinstance(expired, EngineError) and expired.status == 504
    assert expired.code == "request_timeout" and "30 s" in expired.message
    assert "serve.engine.request_timeout_s" in expired.message
    assert sizes[:3] == [2, 2, 2] and set(sizes[3:]) == {1}
    assert done == alone(tiny_model, quick)


@pytest.mark.parametrize("field", ["cancelled", "expired"])
def test_a_waiting_request_that_ends_is_never_prefilled(tiny_model, field):
    _, tok, _ = tiny_model

    async def go():
        sched = scheduler(tiny_model, 1, timeout_s=60.0)
        first = sched.submit(GenRequest("a", prompt(tok, "first"), 6, 0.0, 1.0))
        waiting = sched.submit(GenRequest("b", prompt(tok, "second"), 6, 0.0, 1.0))
        if field == "cancelled":
            sched.cancel(waiting)
        else:
            waiting.deadline = time.monotonic()
        out = await asyncio.gather(
            collect(sched, first), collect(sched, waiting), return_exceptions=True
        )
        sched.task.cancel()
        return out, sched.step_sizes

    (_, second), steps = asyncio.run(go())
    assert sum(steps.values()) == 6  # only the first request's six steps ran
    if field == "cancelled":
        assert second == ""
    else:
        assert isinstance(second, EngineError)
        assert (second.status, second.code) == (504, "request_timeout")


def test_a_waiting_request_past_its_deadline_ends_while_the_batch_is_full(tiny_model):
    """The deadline counts queueing too: a request still waiting for a row gets its 504 at the
    next step, not only once a running row leaves the full batch."""
    model, tok, _ = tiny_model
    never_ends = {t: -100.0 for t in eos_ids(model, tok)}
    slow = GenRequest("slow", prompt(tok, "take your time"), 200, 0.0, 1.0, logit_bias=never_ends)
    sizes: list[int] = []

    async def go():
        sched = scheduler(tiny_model, 1, timeout_s=60.0)
        running = sched.submit(slow)
        waiting = sched.submit(GenRequest("b", prompt(tok, "second"), 6, 0.0, 1.0))

        def on_step(rows: int, seconds: float) -> None:
            sizes.append(rows)
            if len(sizes) == 2:
                waiting.deadline = time.monotonic()  # as if 60 s had passed in the queue

        sched.on_step = on_step
        try:
            await collect(sched, waiting)
        except EngineError as e:
            error, steps = e, len(sizes)
        sched.cancel(running)
        sched.task.cancel()
        return error, steps

    error, steps = asyncio.run(go())
    assert (error.status, error.code, steps) == (504, "request_timeout", 2)


def test_a_request_of_n_choices_takes_n_rows_and_ends_when_all_have(tiny_model):
    """n=3 with room for 4 rows: a second n=3 request waits for room (never 6 rows in a step);
    a request larger than the batch still runs once the batch is empty; each request's queue
    gets every choice's deltas, and ends only after its last choice finished."""
    _, tok, _ = tiny_model
    ids = prompt(tok, "a hard week")
    reqs = [GenRequest(f"r{i}", ids, 6 + 4 * i, 1.0, 1.0, seed=i, n=3) for i in range(2)]
    big = GenRequest("big", ids, 5, 1.0, 1.0, seed=9, n=5)

    async def choices(sched: Scheduler, ticket) -> dict[int, str]:
        texts: dict[int, str] = {}
        async for d in sched.deltas(ticket):
            texts[d.index] = texts.get(d.index, "") + d.text
        return texts

    async def go():
        sched = scheduler(tiny_model, 4)
        out = await asyncio.gather(*(choices(sched, sched.submit(r)) for r in [*reqs, big]))
        sched.task.cancel()
        return out, sched.step_sizes

    out, steps = asyncio.run(go())
    assert [sorted(o) for o in out] == [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4]]
    assert max(steps) == 5  # big ran alone; 3 + 3 rows never shared a step (room is 4)
    for req, texts in zip([*reqs, big], out, strict=True):
        seeds = [req.seed + j for j in range(req.n)]
        single = [GenRequest("x", ids, req.max_tokens, 1.0, 1.0, seed=s) for s in seeds]
        assert [texts[j] for j in range(req.n)] == [alone(tiny_model, r) for r in single]


def test_the_idle_callback_reports_an_empty_batch_after_a_cancellation(tiny_model):
    """The running-requests gauge is set after every step; when the last rows leave without a
    step (cancelled), on_idle sets it to 0 (it used to stay at the last step's count)."""
    _, tok, _ = tiny_model
    idle: list[int] = []
    steps: list[int] = []

    async def go():
        sched = scheduler(tiny_model, 4)
        sched.on_idle, sched.on_step = idle.append, lambda rows, seconds: steps.append(rows)
        ticket = sched.submit(GenRequest("long", prompt(tok, "hi"), 500, 1.0, 1.0, seed=1))
        while not steps:  # decoding
            await asyncio.sleep(0.01)
        sched.cancel(ticket)
        while not idle:
            await asyncio.sleep(0.01)
        sched.task.cancel()
        return sched.live_rows()

    assert asyncio.run(go()) == 0
    assert idle == [0] and steps[0] == 1 and len(steps) < 500
