"""The evaluation modes as async work over endpoint clients: replies to contexts, judge scores
per reply, pairwise comparisons, and Seeker-driven dialogues judged as a whole.

Nothing here knows about Ray: `run.py` runs each phase inside a Ray task. Every request goes
through a shared `EndpointClient` (timeouts, retries, the endpoint's concurrency bound); a
request that fails for good becomes a record with its reason, never an exception that would
lose the rest of the phase.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Awaitable, Sequence
from typing import Any

from soulray.endpoints import EndpointClient, EndpointError, without_help_lines
from soulray.eval.contexts import Context, sent_history
from soulray.eval.judge import (
    Judgement,
    Rubric,
    build_request,
    format_dialogue,
    judge_pair,
    judge_scores,
)
from soulray.synth.roles import Seeker
from soulray.synth.scenarios import Scenario

NO_REPLY = "no reply: the Seeker ended the dialogue before the model replied"


class Progress:
    """'eval generate: 40/200 (20%)' on stderr at every tenth of the work (a Ray task's output
    is forwarded to the driver's terminal)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.shown = label, total, 0, -1

    def step(self) -> None:
        self.done += 1
        tenth = self.done * 10 // max(self.total, 1)
        if tenth != self.shown:
            self.shown = tenth
            pct = 100 * self.done // max(self.total, 1)
            print(f"eval {self.label}: {self.done}/{self.total} ({pct}%)", file=sys.stderr)


async def tracked(work: Sequence[Awaitable[Any]], progress: Progress) -> list[Any]:
    async def one(w: Awaitable[Any]) -> Any:
        result = await w
        progress.step()
        return result

    return await asyncio.gather(*(one(w) for w in work))


async def reply_to(client: EndpointClient, ctx: Context, strategies: bool) -> dict[str, Any]:
    """One model's reply to one context (or the reason there is none)."""
    record: dict[str, Any] = {"context": ctx.id, "text": None, "strategy": None, "error": None}
    try:
        result = await client.chat(sent_history(ctx.messages, strategies))
    except EndpointError as e:
        return record | {"error": e.reason}
    strategy = result.extra.get("strategy")
    return record | {
        "text": result.text.strip(),
        "strategy": strategy if isinstance(strategy, str) else None,
        "completion_tokens": result.completion_tokens,
    }


async def generate(
    client: EndpointClient, model: str, contexts: list[Context], strategies: bool
) -> list[dict]:
    progress = Progress(f"{model} replies", len(contexts))
    return await tracked([reply_to(client, c, strategies) for c in contexts], progress)


async def judge_turns(
    client: EndpointClient,
    rubric: Rubric,
    retries: int,
    contexts: list[Context],
    replies: dict[str, list[dict[str, Any]]],
) -> dict[str, list[dict[str, Any] | None]]:
    """Rubric scores for every reply that exists (None where the model gave none)."""
    jobs: list[Awaitable[Any]] = []
    slots: list[tuple[str, int]] = []
    for model, rows in replies.items():
        for i, (ctx, row) in enumerate(zip(contexts, rows, strict=True)):
            if row["text"] is None:
                continue
            request = build_request(
                "turn", rubric, context=format_dialogue(ctx.messages), reply=row["text"]
            )
            jobs.append(judge_scores(client, request, rubric, retries))
            slots.append((model, i))
    done = await tracked(jobs, Progress("judge", len(jobs)))
    out: dict[str, list[dict[str, Any] | None]] = {m: [None] * len(contexts) for m in replies}
    for (model, i), judgement in zip(slots, done, strict=True):
        out[model][i] = judgement.to_json()
    return out


async def judge_pairs(
    client: EndpointClient,
    rubric: Rubric,
    retries: int,
    contexts: list[Context],
    replies: dict[str, list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Every pair of models on every context both answered, each asked in both orders."""
    results = []
    for m1, m2 in itertools.combinations(replies, 2):
        jobs, ids = [], []
        for ctx, r1, r2 in zip(contexts, replies[m1], replies[m2], strict=True):
            if r1["text"] is None or r2["text"] is None:
                continue
            jobs.append(judge_pair(client, rubric, ctx.messages, r1["text"], r2["text"], retries))
            ids.append(ctx.id)
        done = await tracked(jobs, Progress(f"pairwise {m1} vs {m2}", len(jobs)))
        rows = [{"context": cid} | row for cid, row in zip(ids, done, strict=True)]
        results.append({"model_1": m1, "model_2": m2, "comparisons": rows})
    return results


async def run_dialogue(
    seeker: Seeker, client: EndpointClient, scenario: Scenario, turns: int, strategies: bool
) -> dict[str, Any]:
    """The Seeker speaks up to `turns` times, the model answers each; stops when the Seeker
    ends the chat. The dialogue is kept as messages from the model's side, each reply with the
    strategy its server reported (sent back with the history where `strategies`), and as the
    person saw it: with the help lines soulray serve's crisis screen put in, which the judge
    reads and the Seeker answers. The model is sent its history without them, as `soulray
    chat` sends it: they are not its words."""
    dialogue: list[dict[str, str]] = []
    sent: list[dict[str, str]] = []  # what the model is sent back
    record: dict[str, Any] = {"scenario": scenario.id, "attitude": scenario.attitude}
    record |= {"language": scenario.language, "messages": dialogue, "error": None}
    try:
        for _ in range(turns):
            said = await seeker.reply(scenario, dialogue)
            if said.text:
                dialogue.append({"role": "user", "content": said.text})
                sent.append(dialogue[-1])
            if said.wants_to_stop or not said.text:
                break
            answer = await client.chat(sent_history(sent, strategies))
            strategy = answer.extra.get("strategy")
            used = {"strategy": strategy} if isinstance(strategy, str) else {}
            dialogue.append({"role": "assistant", "content": answer.text.strip()} | used)
            words = without_help_lines(answer.text, answer.extra.get("safety")).strip()
            sent.append({"role": "assistant", "content": words} | used)
    except EndpointError as e:
        record["error"] = e.reason
    # a Seeker's last word with no reply: it ended the chat, unless the model's endpoint failed
    ended = bool(dialogue) and dialogue[-1]["role"] == "user"
    record["ended_by_seeker"] = ended and record["error"] is None
    return record


async def judge_dialogue(
    judge: EndpointClient | None, rubric: Rubric, retries: int, record: dict[str, Any]
) -> dict[str, Any] | None:
    """A played dialogue's verdict: None without a judge or when an endpoint failed it."""
    if judge is None or record["error"] is not None:
        return None
    if not any(m["role"] == "assistant" for m in record["messages"]):
        return Judgement(error=NO_REPLY).to_json()
    request = build_request("dialogue", rubric, context=format_dialogue(record["messages"]))
    return (await judge_scores(judge, request, rubric, retries)).to_json()


async def interactive(
    seeker: Seeker,
    clients: dict[str, EndpointClient],
    judge: EndpointClient | None,
    rubric: Rubric,
    retries: int,
    scenarios: list[Scenario],
    turns: int,
    strategies: set[str],
) -> dict[str, list[dict[str, Any]]]:
    """Each model talks with every scenario; each dialogue with a model reply is judged.
    One the Seeker ended before any reply is recorded as unscored with that reason, so the
    report's scored + unscored + failed add up to the dialogues.
    `strategies` names the models sent their earlier replies' strategies."""

    async def one(model: str, scenario: Scenario) -> dict[str, Any]:
        record = await run_dialogue(seeker, clients[model], scenario, turns, model in strategies)
        record["judge"] = await judge_dialogue(judge, rubric, retries, record)
        return record

    pairs = [(m, s) for m in clients for s in scenarios]
    done = await tracked([one(m, s) for m, s in pairs], Progress("dialogues", len(pairs)))
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in clients}
    for (model, _), record in zip(pairs, done, strict=True):
        out[model].append(record)
    return out
