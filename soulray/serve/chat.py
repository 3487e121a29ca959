"""One chat completion, from a validated request to the reply (whole or as SSE chunks).

prepare: roles and order, crisis screen of every user message, requested strategy, max_tokens
bound, the conversation window -> a GenRequest. Then the engine runs it (or, in the safety
`fixed` mode, a crisis message gets the fixed safe reply without generation), the strategy tag is
split off the reply, help lines come first when a message was flagged (`augment` mode, streamed
too), and the reply itself is screened: a flagged one is replaced by the fixed safe reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from soulray.config import ServeConfig
from soulray.safety.screen import Assessment, Screen, assess, fixed_reply, format_resources
from soulray.serve.engine import EngineClient
from soulray.serve.generate import Delta, GenRequest
from soulray.serve.guard import ReplyGuard, SafetyCounters
from soulray.serve.prompt import (
    ExportInfo,
    StrategyParser,
    canonical_strategy,
    check_messages,
    fit_window,
)
from soulray.serve.schemas import (
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    SafetyInfo,
    Usage,
    now,
    sse,
)
from soulray.serve.schemas import Delta as DeltaOut

log = logging.getLogger("ray.serve.soulray")  # a child of Serve's logger: lands in replica logs


@dataclass(slots=True)
class IngressState:
    """Everything an ingress replica holds, built once at start."""

    cfg: ServeConfig
    info: ExportInfo
    tokenizer: Any
    screen: Screen
    api_key: str | None
    engine: EngineClient
    created: int
    counters: SafetyCounters = field(default_factory=SafetyCounters)


@dataclass(slots=True)
class Prepared:
    id: str
    gen: GenRequest
    safety: SafetyInfo
    parser: StrategyParser
    prompt_tokens: int
    fixed: str | None  # the fixed safe reply (no generation), in safety mode `fixed`
    include_usage: bool
    assessment: Assessment = field(default_factory=Assessment)
    user_texts: list[str] = field(default_factory=list)  # for the reply screen's locale


def prepare(state: IngressState, req: ChatCompletionRequest, request_id: str) -> Prepared:
    cfg, info = state.cfg, state.info
    messages = check_messages(req.messages, cfg, info.system_prompt)
    user_texts = [m["content"] for m in messages if m["role"] == "user"]
    assessment = assess(state.screen, user_texts)
    safety = SafetyInfo.of(assessment)
    if assessment.flagged:
        state.counters.record(assessment, "flagged")
    forced = requested_strategy(req.strategy, info)
    default = min(cfg.default_max_tokens, cfg.max_tokens_limit)
    max_tokens = req.max_completion_tokens or req.max_tokens or default
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
            param="max_tokens",
        )
    budget = info.context_tokens - max_tokens
    if budget < 16:
        raise APIError(
            400,
            f"max_tokens={max_tokens} leaves no room for the prompt in the model's "
            f"{info.context_tokens}-token context; lower max_tokens",
            param="max_tokens",
        )
    prefix = f"[{forced}] " if forced else ""
    ids, dropped = fit_window(state.tokenizer, messages, budget, prefix)
    temperature = info.temperature if req.temperature is None else req.temperature
    gen = GenRequest(
        request_id,
        ids,
        max_tokens,
        temperature,
        req.top_p or info.top_p,
        req.seed,
        [*req.stop_list(), info.end_of_turn],  # a marker of several tokens stops as text
    )
    fixed = fixed_reply(state.screen, assessment) if safety.flagged and _fixed_mode(state) else None
    log.info(
        "request %s: %d messages (%d dropped by the window), %d prompt tokens, max_tokens %d, "
        "stream %s, flagged %s",
        request_id,
        len(messages),
        dropped,
        len(ids),
        max_tokens,
        req.stream,
        safety.flagged,  # not the categories: what a person disclosed stays out of the logs
    )
    if cfg.debug_log_content:
        log.debug("request %s messages: %r", request_id, messages)
    return Prepared(
        request_id,
        gen,
        safety,
        StrategyParser(info.taxonomy, info.strategy_tags, forced),
        len(ids),
        fixed,
        bool(req.stream_options and req.stream_options.include_usage),
        assessment,
        user_texts,
    )


def _fixed_mode(state: IngressState) -> bool:
    return state.screen.cfg.mode == "fixed"


def requested_strategy(name: str | None, info: ExportInfo) -> str | None:
    if name is None:
        return None
    if not info.strategy_tags:
        raise APIError(
            400,
            "this model was not trained with strategy tags (data.strategy_tags), so it "
            "cannot be asked for a strategy; omit `strategy`",
            param="strategy",
        )
    found = canonical_strategy(name, info.taxonomy)
    if found is None:
        raise APIError(
            400,
            f"unknown strategy {name!r}; use one of: {', '.join(info.taxonomy)}",
            param="strategy",
        )
    return found


def _prefix(state: IngressState, p: Prepared) -> str:
    """Help lines put before a model reply for a flagged message (augment mode)."""
    if not p.safety.flagged or p.fixed is not None:
        return ""
    return f"{format_resources(state.screen, p.assessment)}\n\n"


def _guard(state: IngressState, p: Prepared) -> ReplyGuard:
    return ReplyGuard(state.screen, p.assessment, p.user_texts)


def _guarded_safety(state: IngressState, p: Prepared, guard: ReplyGuard) -> SafetyInfo:
    """The response's safety field once the reply is known (and counted if it was replaced)."""
    if guard.replaced is None:
        return p.safety
    state.counters.record(guard.replaced, "replaced")
    return SafetyInfo.of(guard.replaced, reply_replaced=True)


def _usage(p: Prepared, completion: int) -> Usage:
    return Usage(
        prompt_tokens=p.prompt_tokens,
        completion_tokens=completion,
        total_tokens=p.prompt_tokens + completion,
    )


async def complete(state: IngressState, p: Prepared, model: str) -> ChatCompletion:
    guard = _guard(state, p)
    if p.fixed is not None:
        delta = Delta(p.fixed, len(state.tokenizer(p.fixed).input_ids), "stop")
        content = p.fixed
    else:
        delta = await state.engine.complete(p.gen)
        reply = guard.push(p.parser.push(delta.text, final=True), final=True)
        content = reply if guard.replaced else _prefix(state, p) + reply
    _log_reply(state, p, content, delta.tokens)
    return ChatCompletion(
        id=p.id,
        created=now(),
        model=model,
        choices=[
            Choice(
                message=AssistantMessage(content=content),
                finish_reason=delta.finish_reason or "stop",
            )
        ],
        usage=_usage(p, delta.tokens),
        strategy=p.parser.strategy,
        safety=_guarded_safety(state, p, guard),
    )


async def open_stream(state: IngressState, p: Prepared, model: str) -> AsyncIterator[str]:
    """SSE events of the reply. The engine's first delta is awaited here, before the response
    starts, so overload and bad-request errors still become proper HTTP errors."""
    if p.fixed is not None:
        deltas = _single(Delta(p.fixed, len(state.tokenizer(p.fixed).input_ids), "stop"))
    else:
        deltas = aiter(state.engine.stream(p.gen))
    first = await anext(deltas, None)
    return _events(state, p, model, first, deltas)


async def _single(delta: Delta) -> AsyncIterator[Delta]:
    yield delta


async def _events(
    state: IngressState,
    p: Prepared,
    model: str,
    first: Delta | None,
    deltas: AsyncIterator[Delta],
) -> AsyncIterator[str]:
    created = now()

    def chunk(delta: DeltaOut, finish: str | None = None, **extra: Any) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return sse(
            ChatCompletionChunk(
                id=p.id,
                created=created,
                model=model,
                choices=[choice],
                strategy=p.parser.strategy,
                **extra,
            )
        )

    yield chunk(DeltaOut(role="assistant", content=""), safety=p.safety)
    if prefix := _prefix(state, p):  # help lines before the first model token
        yield chunk(DeltaOut(content=prefix))
    last, content, guard = first or Delta("", 0, "stop"), "", _guard(state, p)
    try:
        async for delta in _chain(first, deltas):
            last = delta
            text = p.parser.push(delta.text, final=delta.finish_reason is not None)
            if p.fixed is None:
                text = guard.push(text, final=delta.finish_reason is not None)
            content += text
            if text:
                yield chunk(DeltaOut(content=text))
            if guard.replaced is not None:
                last = Delta("", delta.tokens, "stop")
                break
    except Exception as e:  # the response has started: report the error in the stream
        if not isinstance(e, APIError):
            log.error("request %s: stream failed: %s", p.id, type(e).__name__)
            e = APIError(500, "internal server error", type="server_error")
        yield sse(_error_json(e))
        yield sse("[DONE]")
        return
    safety = _guarded_safety(state, p, guard)
    yield chunk(DeltaOut(), finish=last.finish_reason or "stop", safety=safety)
    if p.include_usage:
        yield sse(
            ChatCompletionChunk(
                id=p.id,
                created=created,
                model=model,
                choices=[],
                usage=_usage(p, last.tokens),
                strategy=p.parser.strategy,
            )
        )
    yield sse("[DONE]")
    _log_reply(state, p, content, last.tokens)


async def _chain(first: Delta | None, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    if first is not None:
        yield first
        async for delta in rest:
            yield delta


def _error_json(e: APIError) -> str:
    return json.dumps(e.body())


def _log_reply(state: IngressState, p: Prepared, content: str, tokens: int) -> None:
    log.info("request %s: replied %d tokens, strategy %s", p.id, tokens, p.parser.strategy)
    if state.cfg.debug_log_content:
        log.debug("request %s reply: %r", p.id, content)
