"""Generation engines as Ray Serve deployments, and the ingress's client for each.

- `hf`: transformers on CPU or GPU. The replica's `Scheduler` decodes every request in one
  left-padded batch, one forward per token; requests join the running batch between tokens
  (continuous batching) and leave it (done, cancelled by a gone client, or past the deadline) at
  once. Text streams per row, coalesced into fewer, larger messages (`coalesce`). With batching
  disabled the batch size is 1: requests run one at a time (the benchmark baseline). The replica
  counts the batch sizes it actually ran (`counters`), so tests can assert batching.
- `vllm`: Ray Serve LLM's `LLMServer` (vLLM), built from the same serve config; the ingress sends
  it the rendered prompt ids through its `completions` method. Needs vLLM (GPU images).
- `noop`: a fixed reply with no model, to measure what Ray Serve itself costs.

The ingress talks to any of them through `EngineClient.complete` / `EngineClient.stream`, which
turn Serve's overload and dead-replica errors into OpenAI-shaped 503s and the engine's own
`EngineError`s (prefill failure, deadline) into OpenAI-shaped errors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from soulray import storage
from soulray.config import EngineConfig, ServeConfig
from soulray.serve.adapters import AdapterPool
from soulray.serve.fetch import fetch_model_dir, wait_for_export
from soulray.serve.generate import (
    Delta,
    GenRequest,
    StopMatcher,
    add_delta,
    eos_ids,
    join_deltas,
    load_model,
    whole_replies,
    width,
)
from soulray.serve.logits import TokenLogprob
from soulray.serve.metrics import EngineMetrics
from soulray.serve.scheduler import EngineError, Scheduler, Ticket
from soulray.serve.schemas import APIError

NOOP_TOKENS = ("I", " hear", " you.")  # the noop engine's fixed reply, a word a token


class HFEngine:
    """The `hf` engine replica: one model, continuous batching, token streaming."""

    def __init__(
        self,
        engine: dict[str, Any],
        model_dir: str,
        adapters: dict[str, str] | None = None,
        max_loaded_adapters: int = 4,
        wait_s: int = 0,
    ) -> None:
        cfg = EngineConfig.model_validate(engine)
        local = fetch_model_dir(model_dir, wait_s=wait_s)
        adapter = fetch_model_dir(cfg.adapter_dir, wait_s=wait_s) if cfg.adapter_dir else None
        if wait_s:  # serve.adapters load at their first request, which never waits: wait now
            for path in (adapters or {}).values():
                wait_for_export(path, wait_s)
        model, tokenizer, device = load_model(local, adapter, cfg.dtype, cfg.num_gpus > 0)
        size = cfg.batching.max_batch_size if cfg.batching.enabled else 1
        self.adapters = AdapterPool(model, adapters, max_loaded_adapters) if adapters else None
        self.scheduler = Scheduler(
            model,
            tokenizer,
            eos_ids(model, tokenizer),
            device,
            size,
            timeout_s=cfg.request_timeout_s,
            wait_s=cfg.batching.batch_wait_timeout_s,
            adapters=self.adapters,
        )
        self.stream_interval_s = cfg.stream_interval_s
        self.max_messages_per_s = cfg.stream_max_messages_per_s
        self.metrics = EngineMetrics()
        self.scheduler.on_step = self._record_step
        self.scheduler.on_idle = lambda waiting: self.metrics.record_queue(waiting, 0)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        ticket = self.scheduler.submit(req)
        try:
            async for delta in coalesce(self._deltas(ticket), self.stream_interval):
                yield delta
        finally:  # here, not only in the inner generators: Serve cancels a gone client's
            self.scheduler.cancel(ticket)  # stream at this yield, and they close only on GC

    def stream_interval(self) -> float:
        """Seconds between one stream's messages now: serve.engine.stream_interval_s, stretched
        so that all live streams together send at most stream_max_messages_per_s."""
        if self.max_messages_per_s is None:
            return self.stream_interval_s
        share = self.scheduler.live_rows() / self.max_messages_per_s
        return max(self.stream_interval_s, share)

    async def generate(self, req: GenRequest) -> list[Delta]:
        """The whole reply of each of the request's n choices, in index order."""
        ticket = self.scheduler.submit(req)
        choices: dict[int, Delta] = {}
        try:
            async for delta in self._deltas(ticket):
                add_delta(choices, delta)
        finally:
            self.scheduler.cancel(ticket)
        return whole_replies(choices)

    async def _deltas(self, ticket: Ticket) -> AsyncIterator[Delta]:
        self.metrics.record_queue(len(self.scheduler.waiting), self.scheduler.live_rows())
        first = True
        async for delta in self.scheduler.deltas(ticket):
            if first:
                self.metrics.record_first_token(ticket.submitted)
                first = False
            yield delta

    def _record_step(self, rows: int, seconds: float) -> None:
        sched = self.scheduler
        self.metrics.record_step(rows, seconds, len(sched.waiting), sched.live_rows())

    def counters(self) -> dict[str, Any]:
        """What this replica ran: requests, the rows in each forward pass (`step_sizes`;
        `max_batch` is the largest), and the rows and KV columns held right now."""
        sched = self.scheduler
        return {
            "requests": sched.requests,
            "step_sizes": dict(sched.step_sizes),
            "max_batch": max(sched.step_sizes, default=0),
            "step_seconds": sched.step_seconds,
            "live_rows": sched.live_rows(),
            "kv_width": width(sched.batch) if sched.batch else 0,
            "adapter_loads": dict(self.adapters.loads) if self.adapters else {},
            "adapters_loaded": list(self.adapters.loaded) if self.adapters else [],
        }


async def coalesce(
    deltas: AsyncIterator[Delta], interval_s: float | Callable[[], float]
) -> AsyncIterator[Delta]:
    """Merge deltas that arrive within `interval_s` (a number, or a function giving the current
    one) of the last one sent: every message costs a hop through Serve (engine -> ingress ->
    proxy), a token does not need one each. The first delta goes out at once (time to first
    token is unchanged), the last one always. Deltas of the n choices of one request are merged
    per choice and sent together."""
    interval = interval_s if callable(interval_s) else lambda: interval_s
    pending: dict[int, Delta] = {}
    sent_at = 0.0
    async for delta in deltas:
        if delta.index in pending:
            delta = join_deltas(pending.pop(delta.index), delta)
        now = time.monotonic()
        if sent_at and delta.finish_reason is None and now - sent_at < interval():
            pending[delta.index] = delta
            continue
        sent_at = now
        for held in pending.values():
            yield held
        pending.clear()
        yield delta
    for held in pending.values():
        yield held


class NoopEngine:
    """Answers at once with a fixed reply: the Serve path minus any model work."""

    def __init__(self, engine: dict[str, Any], model_dir: str, *_: Any) -> None:
        del engine, model_dir

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        for delta in await self.generate(req):
            yield delta

    async def generate(self, req: GenRequest) -> list[Delta]:
        """The fixed reply once per choice."""
        return [noop_reply(req, k) for k in range(req.n)]

    def counters(self) -> dict[str, Any]:
        return {"requests": 0, "step_sizes": {}, "max_batch": 0, "live_rows": 0, "kv_width": 0}


def noop_reply(req: GenRequest, index: int) -> Delta:
    """The fixed reply as a model would give it: cut at a stop string, or at max_tokens
    (finish_reason "length")."""
    stops, text = StopMatcher(req.stop), ""
    for n, token in enumerate(NOOP_TOKENS[: req.max_tokens], 1):
        out, stopped = stops.push(token)
        text += out
        if stopped:
            return Delta(text, n, "stop", index)
    finish = "length" if req.max_tokens < len(NOOP_TOKENS) else "stop"
    return Delta(text + stops.flush()[0], min(req.max_tokens, len(NOOP_TOKENS)), finish, index)


def replica_options(cfg: EngineConfig | Any, name: str) -> dict[str, Any]:
    """Serve deployment options (autoscaling, queue bounds, resources) from a config section."""
    return {
        "name": name,
        "autoscaling_config": cfg.autoscaling.model_dump(),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "health_check_period_s": cfg.health_check_period_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }


def as_deployment(cls: type) -> Any:
    """serve.deployment(cls), typed loosely (Ray's stubs overload it as a decorator factory)."""
    return serve.deployment(cls)


def build_engine(cfg: ServeConfig, model_dir: str) -> Any:
    """The bound engine deployment for serve.engine.kind (an Application to pass the ingress)."""
    options = replica_options(cfg.engine, "Engine")
    args = engine_args(cfg, model_dir)
    match cfg.engine.kind:
        case "hf":
            return as_deployment(HFEngine).options(**options).bind(*args)
        case "noop":
            return as_deployment(NoopEngine).options(**options).bind(*args)
        case "vllm":
            return build_vllm_engine(cfg, model_dir)
    raise ValueError(f"unknown serve.engine.kind {cfg.engine.kind!r}; use hf, vllm or noop")


def engine_args(cfg: ServeConfig, model_dir: str) -> tuple[Any, ...]:
    """HFEngine's arguments: the engine section, the model, the adapters (name -> path), how
    many stay loaded, how long to wait for the export."""
    adapters = {a.name: a.path for a in cfg.adapters}
    engine = cfg.engine.model_dump(mode="json")
    return engine, model_dir, adapters, cfg.max_loaded_adapters, cfg.wait_for_model_s


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "serve.engine.kind=vllm needs vLLM, which is not installed in this environment "
            "(install `ray[llm]` on a GPU image); use serve.engine.kind=hf to serve with "
            "transformers instead"
        )


def build_vllm_engine(cfg: ServeConfig, model_dir: str) -> Any:
    """Ray Serve LLM's vLLM deployment, configured from serve.engine."""
    require_vllm()  # adapters and one_deployment with vllm: refused by ServeConfig itself
    from ray.serve.llm import LLMConfig, build_llm_deployment

    source: Any = {"bucket_uri": model_dir} if storage.is_remote(model_dir) else model_dir
    engine_kwargs = {"dtype": cfg.engine.dtype, **cfg.engine.vllm_engine_kwargs}
    deployment = replica_options(cfg.engine, "Engine")
    del deployment["name"], deployment["ray_actor_options"]  # LLMServer sizes its own resources
    llm_config = LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": source},
        engine_kwargs=engine_kwargs,
        deployment_config=deployment,
    )
    return build_llm_deployment(llm_config, name_prefix="soulray-")


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Serve's overload and dead-replica errors as OpenAI-shaped 503s; the engine's errors as
    the OpenAI errors they describe."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    try:
        yield
    except EngineError as e:
        raise _api_error(e) from None
    except RayTaskError as e:
        if isinstance(e.cause, EngineError):
            raise _api_error(e.cause) from None
        raise
    except BackPressureError:
        raise APIError(
            503, "the server is overloaded; retry shortly", type="server_error", code="overloaded"
        ) from None
    except (DeploymentUnavailableError, RayActorError, ActorUnavailableError):
        raise APIError(
            503,
            "no engine replica is available right now; retry shortly",
            type="server_error",
            code="engine_unavailable",
        ) from None


def _api_error(e: EngineError) -> APIError:
    return APIError(e.status, e.message, type="server_error", code=e.code)


class EngineClient:
    """The ingress's view of an hf or noop engine deployment."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle, self.streaming = handle, handle.options(stream=True)

    async def complete(self, req: GenRequest) -> list[Delta]:
        """Each choice's whole reply, in index order."""
        with engine_errors():
            return await self.handle.generate.remote(req)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        with engine_errors():
            stream: Any = self.streaming.stream.remote(req)
            try:
                async for delta in stream:
                    yield delta
            except BaseException:  # closed early (the client went away) or failed: stop it now,
                stream.cancel()  # not when the garbage collector gets to the stream
                raise


class LocalClient(EngineClient):
    """An hf or noop engine inside the ingress replica (serve.layout=one_deployment): the same
    interface with no handle and no hop."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def complete(self, req: GenRequest) -> list[Delta]:
        with engine_errors():
            return await self.engine.generate(req)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        # aclosing: a stream closed early (the client went away) closes the engine's stream,
        # whose `finally` frees the row now; `async for` alone leaves that to the GC
        with engine_errors():
            async with contextlib.aclosing(self.engine.stream(req)) as deltas:
                async for delta in deltas:
                    yield delta


def build_local_engine(cfg: ServeConfig, model_dir: str) -> LocalClient:
    """The engine object itself, for the one-deployment layout (hf or noop)."""
    args = engine_args(cfg, model_dir)
    match cfg.engine.kind:
        case "hf":
            return LocalClient(HFEngine(*args))
        case "noop":
            return LocalClient(NoopEngine(*args))
    raise ValueError(
        f"serve.layout=one_deployment runs the hf or noop engine in the ingress; "
        f"serve.engine.kind={cfg.engine.kind} needs serve.layout=two_deployments"
    )


class VLLMClient(EngineClient):
    """The ingress's view of Ray Serve LLM's LLMServer: prompt ids in, streamed text out."""

    def __init__(self, handle: DeploymentHandle, model_id: str) -> None:
        super().__init__(handle)
        self.model_id = model_id

    async def complete(self, req: GenRequest) -> list[Delta]:
        choices: dict[int, Delta] = {}
        async for delta in self.stream(req):
            add_delta(choices, delta)
        return whole_replies(choices)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        from ray.serve.llm.openai_api_models import CompletionRequest

        request = CompletionRequest(**vllm_request_fields(req, self.model_id))
        tokens: dict[int, int] = {}  # per choice: counted from its logprobs when n > 1
        with engine_errors():
            stream: Any = self.streaming.completions.remote(request)
            try:
                async for item in stream:
                    for event in item if isinstance(item, list) else [item]:
                        for chunk in _sse_payloads(event):
                            usage = chunk.get("usage") or {}
                            for choice in chunk.get("choices") or []:
                                yield _vllm_delta(req, choice, usage, tokens)
            except BaseException:  # as EngineClient.stream: stop the generation now
                stream.cancel()
                raise


def vllm_request_fields(req: GenRequest, model_id: str) -> dict[str, Any]:
    """vLLM's completions request for a GenRequest (prompt ids in, streamed text out). With
    n > 1, each choice's tokens are counted from its logprobs (k = 0 costs one value a token),
    as vLLM's usage counts all choices together."""
    logprobs = req.logprobs if req.logprobs is not None or req.n == 1 else 0
    return {
        "model": model_id,
        "prompt": req.prompt_ids,
        "max_tokens": req.max_tokens,
        # top_p 0 (the top token alone) is greedy: vLLM takes top_p in (0, 1] only
        "temperature": req.temperature if req.top_p > 0 else 0.0,
        "top_p": req.top_p if req.top_p > 0 else 1.0,
        "seed": req.seed,
        "stop": req.stop or None,
        "n": req.n,
        "logprobs": logprobs,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": {str(k): v for k, v in req.logit_bias.items()} or None,
        **req.vllm_only,  # response_format: vLLM's structured output
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def _vllm_delta(
    req: GenRequest, choice: dict[str, Any], usage: dict[str, Any], tokens: dict[int, int]
) -> Delta:
    """One streamed completions choice as a Delta (logprobs in the chat shape)."""
    index = int(choice.get("index") or 0)
    found = choice.get("logprobs") or {}
    if req.n == 1:
        tokens[index] = usage.get("completion_tokens", tokens.get(index, 0))
    else:
        tokens[index] = tokens.get(index, 0) + len(found.get("tokens") or [])
    logprobs = None
    if req.logprobs is not None:
        texts, values = found.get("tokens") or [], found.get("token_logprobs") or []
        tops = found.get("top_logprobs") or [{} for _ in texts]
        logprobs = [
            _vllm_logprob(token, lp, top or {})
            for token, lp, top in zip(texts, values, tops, strict=False)
        ]
    text = choice.get("text") or ""
    return Delta(text, tokens[index], choice.get("finish_reason"), index, logprobs)


def _vllm_logprob(token: str, logprob: float, top: dict[str, float]) -> TokenLogprob:
    """vLLM's completions logprobs (token text -> logprob) as a chat logprobs entry."""
    alternatives = [TokenLogprob(t, float(v), list(t.encode("utf-8"))) for t, v in top.items()]
    return TokenLogprob(token, float(logprob), list(token.encode("utf-8")), alternatives)


def _sse_payloads(event: Any) -> list[dict[str, Any]]:
    """JSON payloads in one LLMServer stream item ("data: {...}\\n\\n" strings or errors)."""
    if not isinstance(event, str):
        error = getattr(event, "error", None)
        raise APIError(
            503, f"vllm engine error: {getattr(error, 'message', event)}", type="server_error"
        )
    out = []
    for line in event.splitlines():
        data = line.removeprefix("data: ").strip()
        if data and data != "[DONE]":
            out.append(json.loads(data))
    return out
