"""Continuous batching for the `hf` engine: requests join the running batch between tokens.

The scheduler owns the one batch the model decodes. Every request gets a `Ticket`; before every
step the scheduler admits waiting tickets while the batch has room (`max_rows`): their prompts are
prefilled together and merged into the running batch (`generate.merge`), so a request never waits
for a whole earlier batch to finish. Each ticket's queue receives its Delta after every step, then
None when it is done, or an `EngineError`.

What keeps a replica up under steady traffic:
- finished, cancelled (client gone) and expired (past `timeout_s`) rows leave the batch, its KV
  cache and its mask before the next forward pass, and padding columns are trimmed, so memory and
  step time follow the live requests (`generate.select`, `generate.trim`);
- a prefill that fails fails only the tickets being admitted (one at a time on a retry, so one bad
  request does not take its neighbours down), never the running batch.

Forward passes run in a thread: the replica's event loop keeps taking requests and streaming text
meanwhile. No Ray here: tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from soulray.serve.adapters import AdapterPool
from soulray.serve.generate import (
    Delta,
    GenRequest,
    Running,
    can_merge,
    merge,
    prefill,
    select,
    step,
)

log = logging.getLogger("ray.serve.soulray")


class EngineError(Exception):
    """A request the engine could not finish; the ingress turns it into an OpenAI error body.
    Plain positional args so it pickles across Ray."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message, code)
        self.status, self.message, self.code = status, message, code


@dataclass(eq=False)
class Ticket:
    """One request in the scheduler; `queue` receives a Delta per step and choice, then None
    (or an error) once all of its `req.n` rows are done."""

    req: GenRequest
    deadline: float | None  # time.monotonic() after which the request is ended
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    finished_rows: int = 0


class Scheduler:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos: set[int],
        device: str,
        max_rows: int,
        timeout_s: float | None = None,
        wait_s: float = 0.0,
        adapters: AdapterPool | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos, self.device = model, tokenizer, eos, device
        self.adapters = adapters  # multi-LoRA: loads each request's adapter before its prefill
        self.max_rows, self.timeout_s, self.wait_s = max_rows, timeout_s, wait_s
        self.waiting: deque[Ticket] = deque()
        self.batch: Running | None = None
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.step_sizes: Counter[int] = Counter()  # rows in each forward pass actually run
        self.requests = 0
        self.step_seconds = 0.0  # total time in forward passes (soak: mean step time per window)
        self.on_step: Any = None  # optional callback(rows, seconds) after every step (metrics)
        self.on_idle: Any = None  # optional callback(waiting) when no row is left (metrics)

    def submit(self, req: GenRequest) -> Ticket:
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        ticket = Ticket(req, deadline)
        self.waiting.append(ticket)
        self.requests += 1
        if self.task is None:  # created on first use, on the replica's own event loop
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self.run())
        assert self.wake is not None
        self.wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The caller is gone: its row leaves the batch before the next forward pass."""
        if not ticket.done:
            ticket.cancelled = True

    async def deltas(self, ticket: Ticket) -> AsyncIterator[Delta]:
        """The ticket's deltas as they come; cancels the ticket if the consumer stops early
        (a client that disconnected cancels the task awaiting here)."""
        try:
            while (item := await ticket.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel(ticket)

    def live_rows(self) -> int:
        return len(self.batch.rows) if self.batch else 0

    async def run(self) -> None:
        assert self.wake is not None
        while True:
            try:
                await self._turn()
            except Exception as e:  # a failed step fails the running rows, not the replica
                self._fail_running(e)

    async def _turn(self) -> None:
        """Admit, evict, then one step for every running row."""
        assert self.wake is not None
        if self.batch is None and self.waiting and self.wait_s:
            await asyncio.sleep(self.wait_s)  # let arrivals that come together prefill together
        await self._admit()
        await asyncio.sleep(0)  # let cancellations already delivered reach their tickets
        self._evict()
        if self.batch is None:
            if self.on_idle is not None:  # the last rows left without a step (cancelled)
                self.on_idle(len(self.waiting))
            self.wake.clear()
            if not self.waiting:
                await self.wake.wait()
            return
        rows, started = len(self.batch.rows), time.perf_counter()
        self.step_sizes[rows] += 1
        out = await asyncio.to_thread(step, self.model, self.batch, self.eos)
        seconds = time.perf_counter() - started
        self.step_seconds += seconds
        self._dispatch(out)
        if self.on_step is not None:
            self.on_step(rows, seconds)
        if not self.batch.rows:
            self.batch = None

    async def _admit(self) -> None:
        room = self.max_rows - self.live_rows()
        if self.batch is not None and not can_merge(self.batch):
            room = 0  # a cache that cannot be merged: new rows wait for the batch to finish
        taken: list[Ticket] = []
        used = 0  # rows the tickets taken need (n each)
        while self.waiting and used < room:
            ticket = self.waiting.popleft()
            if self._ended(ticket):
                continue
            if used + ticket.req.n > room and (taken or self.batch is not None):
                self.waiting.appendleft(ticket)  # its n rows wait until they all fit
                break
            ready = await self._adapter_ready(ticket, taken)
            if ready is None:  # every adapter slot is in use: wait (in order) for one to free
                self.waiting.appendleft(ticket)
                break
            if ready:
                taken.append(ticket)
                used += ticket.req.n
        if not taken:
            return
        try:
            self.batch = await asyncio.to_thread(self._join, taken)
        except Exception as e:
            if len(taken) == 1:
                self._finish(taken[0], _prefill_error(e))
                return
            for ticket in taken:  # one at a time: only the request that fails is failed
                try:
                    self.batch = await asyncio.to_thread(self._join, [ticket])
                except Exception as one:
                    self._finish(ticket, _prefill_error(one))

    async def _adapter_ready(self, ticket: Ticket, taken: list[Ticket]) -> bool | None:
        """Load the ticket's adapter if needed: True = ready, None = no free slot yet,
        False = it failed to load (the ticket is finished with the error)."""
        name = ticket.req.adapter
        if name is None or self.adapters is None:
            return True
        rows = self.batch.rows if self.batch else []
        busy = {r.req.adapter for r in rows} | {t.req.adapter for t in taken}
        loaded_by_others = {a for a in busy if a is not None}
        try:
            ok = await asyncio.to_thread(self.adapters.ensure, name, loaded_by_others)
        except Exception as e:
            log.error("adapter %s failed to load: %s", name, type(e).__name__)
            self._finish(
                ticket,
                EngineError(
                    500,
                    f"the adapter {name!r} could not be loaded ({type(e).__name__}: {e})",
                    "adapter_load_failed",
                ),
            )
            return False
        self.model = self.adapters.model  # a PeftModel once the first adapter is in
        return True if ok else None

    def _join(self, tickets: list[Ticket]) -> Running:
        joining = prefill(
            self.model, self.tokenizer, [t.req for t in tickets], self.device, tickets
        )
        return joining if self.batch is None else merge(self.batch, joining)

    def _ended(self, ticket: Ticket) -> bool:
        """Finish a cancelled or expired ticket; True if it ended."""
        if ticket.cancelled:
            self._finish(ticket, None)
            return True
        if ticket.deadline is not None and time.monotonic() > ticket.deadline:
            self._finish(ticket, self._timeout_error())
            return True
        return False

    def _evict(self) -> None:
        """Cancelled and expired rows leave the batch (and its cache) before the next step, and
        such tickets leave the queue: a full batch must not hold a request past its deadline."""
        self.waiting = deque(t for t in self.waiting if not self._ended(t))
        if self.batch is None:
            return
        keep = [k for k, row in enumerate(self.batch.rows) if not self._ended(row.tag)]
        select(self.batch, keep)
        if not self.batch.rows:
            self.batch = None

    def _timeout_error(self) -> EngineError:
        return EngineError(
            504,
            f"the request ran past this server's limit of {self.timeout_s:g} s "
            "(serve.engine.request_timeout_s) and was stopped; lower max_tokens or retry later",
            "request_timeout",
        )

    def _dispatch(self, out: list[tuple[Any, Delta]]) -> None:
        for row, delta in out:
            ticket: Ticket = row.tag
            ticket.queue.put_nowait(delta)
            if delta.finish_reason is not None:
                ticket.finished_rows += 1
                if ticket.finished_rows == ticket.req.n:
                    self._finish(ticket, None)

    def _finish(self, ticket: Ticket, error: Exception | None) -> None:
        if ticket.done:
            return
        ticket.done = True
        if error is not None:
            ticket.queue.put_nowait(error)
        ticket.queue.put_nowait(None)

    def _fail_running(self, error: Exception) -> None:
        log.error("engine step failed: %s", type(error).__name__)  # no message: may quote text
        failure = EngineError(500, "the engine failed while generating", "engine_error")
        for row in self.batch.rows if self.batch else []:
            self._finish(row.tag, failure)
        self.batch = None


def _prefill_error(error: Exception) -> EngineError:
    log.error("prefill failed: %s", type(error).__name__)  # no message: it may quote content
    return EngineError(
        500,
        f"the engine could not start this request (prefill failed: {type(error).__name__}); "
        "requests already running were not affected",
        "prefill_failed",
    )
