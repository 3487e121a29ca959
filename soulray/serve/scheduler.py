"""Continuous batching for the `hf` engine: requests join the running batch between tokens.

`@serve.batch` groups the requests that arrive together (admission); the scheduler owns the one
batch the model decodes. Before every step it admits waiting groups while the batch has room
(`max_rows`): their prompts are prefilled together and merged into the running batch
(`generate.merge`), so a request never waits for a whole earlier batch to finish, which is what
keeps batches full under steady load. Finished rows leave the batch at once. Each group gets,
after every step, the list of its rows' deltas (None for rows already done) on its queue, then
None when all of its rows are done. Forward passes run in a thread: the replica's event loop keeps
taking requests and streaming text meanwhile. No Ray here: tests drive it directly.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from soulray.serve.generate import Delta, GenRequest, Running, can_merge, merge, prefill, step


@dataclass(eq=False)
class Group:
    """Requests admitted together; `queue` receives one list per step, then None."""

    reqs: list[GenRequest]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    left: int = 0


class Scheduler:
    def __init__(self, model: Any, tokenizer: Any, eos: set[int], device: str, max_rows: int):
        self.model, self.tokenizer, self.eos, self.device = model, tokenizer, eos, device
        self.max_rows = max_rows
        self.waiting: deque[Group] = deque()
        self.batch: Running | None = None
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.step_sizes: Counter[int] = Counter()  # rows in each forward pass actually run

    def submit(self, reqs: list[GenRequest]) -> asyncio.Queue:
        if len(reqs) > self.max_rows:
            raise ValueError(f"{len(reqs)} requests exceed the batch limit of {self.max_rows}")
        group = Group(reqs, left=len(reqs))
        self.waiting.append(group)
        if self.task is None:  # created on first use, on the replica's own event loop
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self.run())
        assert self.wake is not None
        self.wake.set()
        return group.queue

    async def run(self) -> None:
        assert self.wake is not None
        while True:
            try:
                await self._admit()
                if self.batch is None:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                self.step_sizes[len(self.batch.rows)] += 1
                out = await asyncio.to_thread(step, self.model, self.batch, self.eos)
                self._dispatch(out)
                if not self.batch.rows:
                    self.batch = None
            except Exception as e:  # a failed forward fails its requests, not the replica
                self._fail(e)

    async def _admit(self) -> None:
        room = self.max_rows - (len(self.batch.rows) if self.batch else 0)
        if self.batch is not None and not can_merge(self.batch):
            room = 0  # a cache that cannot be merged: new rows wait for the batch to finish
        taken: list[Group] = []
        while self.waiting and len(self.waiting[0].reqs) <= room:
            taken.append(self.waiting.popleft())
            room -= len(taken[-1].reqs)
        if not taken:
            return
        reqs = [r for g in taken for r in g.reqs]
        tags = [(g, i) for g in taken for i in range(len(g.reqs))]
        try:
            self.batch = await asyncio.to_thread(self._join, reqs, tags)
        except Exception as e:
            for group in taken:
                group.queue.put_nowait(e)
            raise

    def _join(self, reqs: list[GenRequest], tags: list[tuple[Group, int]]) -> Running:
        joining = prefill(self.model, self.tokenizer, reqs, self.device, tags)
        return joining if self.batch is None else merge(self.batch, joining)

    def _dispatch(self, out: list[tuple[Any, Delta]]) -> None:
        per_group: dict[Group, list[Delta | None]] = {}
        for row, delta in out:
            group, index = row.tag
            per_group.setdefault(group, [None] * len(group.reqs))[index] = delta
            if delta.finish_reason is not None:
                group.left -= 1
        for group, deltas in per_group.items():
            group.queue.put_nowait(deltas)
            if group.left == 0:
                group.queue.put_nowait(None)

    def _fail(self, error: Exception) -> None:
        groups = {row.tag[0] for row in self.batch.rows} if self.batch else set()
        for group in groups:
            group.queue.put_nowait(error)
        self.batch = None
