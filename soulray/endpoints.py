"""The one async client for OpenAI-compatible endpoints (synth's roles, eval's models and judge).

Written once because both stages need the same three things: a timeout per request, retries with
exponential backoff on the failures that pass (429, 5xx, refused or dropped connections,
timeouts), and a bound on how many requests one endpoint sees at a time. A request that still
fails after its retries raises `EndpointError` with the reason, so a caller can fail one
dialogue and keep going.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # openai takes about a second to import: only the calls load it, not the
    import openai  # config tree that names an EndpointConfig (every soulray verb and worker)

# Status codes worth another try: the server may answer differently in a moment.
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
NO_KEY = "EMPTY"  # local servers (`soulray serve` without auth, vLLM) ignore the key


class EndpointConfig(BaseModel):
    """One OpenAI-compatible endpoint and how to call it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # the env var holding the key; None = no key
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1)
    timeout_s: float = Field(60, gt=0)  # per request attempt
    max_retries: int = Field(3, ge=0)  # retries after the first attempt
    concurrency: int = Field(8, ge=1)  # requests in flight to this endpoint, per process


class EndpointError(RuntimeError):
    """A request that failed for good; `reason` is a short label plus the detail."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)  # non-OpenAI fields (soulray: strategy)


# A completion body's standard fields; anything else is a server's extension (`extra`).
STANDARD_FIELDS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"}
)


class EndpointClient:
    """Chat completions against one endpoint, bounded and retried; build with `build_client`."""

    def __init__(
        self,
        cfg: EndpointConfig,
        client: openai.AsyncOpenAI,
        backoff_s: float = 0.5,
        semaphore: asyncio.Semaphore | None = None,
    ):
        self.cfg = cfg
        self._client = client
        self._backoff_s = backoff_s
        self._semaphore = semaphore or asyncio.Semaphore(cfg.concurrency)
        self.retries = 0  # attempts that failed and were tried again (for reports)

    async def chat(self, messages: list[dict[str, str]], **overrides: Any) -> ChatResult:
        """One completion; `overrides` replace request fields (temperature, max_tokens, ...)."""
        import openai

        request = {
            "model": self.cfg.model,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        } | overrides
        async with self._semaphore:
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    return await self._once(messages, request)
                except openai.APIError as e:
                    reason = describe_error(e, self.cfg.base_url)
                    if not is_retryable(e) or attempt == self.cfg.max_retries:
                        raise EndpointError(reason) from e
                self.retries += 1
                await asyncio.sleep(backoff_delay(attempt, self._backoff_s))
        raise AssertionError("unreachable")

    async def _once(self, messages: list[dict[str, str]], request: dict[str, Any]) -> ChatResult:
        # The client's raw `post` (its documented way to send any body): the same timeouts,
        # errors and connection pool as chat.completions.create, without its per-request walk
        # of every message against the typed params and its response models, which cost more
        # CPU than the rest of a role-play turn (profiled: ~45 % of a turn's CPU).
        body = {"messages": messages, **request}
        try:
            data = await self._client.post("/chat/completions", cast_to=dict[str, Any], body=body)
        except ValueError as e:  # a 200 whose body is not JSON: this request fails, not the job
            url = self.cfg.base_url
            raise EndpointError(
                f"bad_response: {url} answered a body that is not JSON ({e})"
            ) from e
        return parse_completion(data, self.cfg.base_url)

    async def aclose(self) -> None:
        await self._client.close()


def parse_completion(data: Any, base_url: str) -> ChatResult:
    """Text and usage of a chat completion body; EndpointError when it is not one."""
    try:
        text = data["choices"][0]["message"]["content"] or ""
        if not isinstance(text, str):  # e.g. a number: the reply would break every reader
            raise TypeError(text)
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"bad_response: {base_url} answered {str(data)[:200]!r}") from None
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}  # "usage": "none" is no count, no failure
    return ChatResult(
        text=text,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        extra={k: v for k, v in data.items() if k not in STANDARD_FIELDS},
    )


def _count(value: Any) -> int:
    """A token count from a reply's usage; 0 when it is none ("n/a", null, -1): the reply is
    good, and a usage field out of shape failed the whole synth or eval run."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value)) if math.isfinite(value) else 0


def build_client(
    cfg: EndpointConfig, backoff_s: float = 0.5, semaphore: asyncio.Semaphore | None = None
) -> EndpointClient:
    """A client for `cfg`; the key is read from `cfg.api_key_env` now, so a missing one fails
    before any dialogue starts. Retries are ours (counted, uniform), not the SDK's. Clients of
    one endpoint (several roles on one server) can share `semaphore` to share one bound."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=cfg.base_url,
        api_key=api_key(cfg),
        timeout=cfg.timeout_s,
        max_retries=0,
        http_client=build_http_client(cfg.timeout_s),
    )
    return EndpointClient(cfg, client, backoff_s, semaphore)


def build_clients(endpoints: dict[str, EndpointConfig]) -> dict[str, EndpointClient]:
    """One client per name; names on one server (same base_url: two models or a LoRA adapter on
    one vLLM, synth's three roles on one backend) share one bound, their smallest concurrency."""
    limits: dict[str, int] = {}
    for ep in endpoints.values():
        limits[ep.base_url] = min(limits.get(ep.base_url, ep.concurrency), ep.concurrency)
    bounds = {url: asyncio.Semaphore(n) for url, n in limits.items()}
    return {name: build_client(ep, semaphore=bounds[ep.base_url]) for name, ep in endpoints.items()}


async def close_all(clients: Iterable[EndpointClient]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients))


def api_key(cfg: EndpointConfig) -> str:
    """The endpoint's key from its environment variable; a missing one is a user error."""
    if cfg.api_key_env is None:
        return NO_KEY
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ValueError(
            f"endpoint {cfg.base_url}: environment variable {cfg.api_key_env} is not set; "
            "export it (in a job sent with `soulray submit`, pass it: --env "
            f"{cfg.api_key_env}) or set api_key_env: null for an endpoint without a key"
        )
    return key


def help_paragraphs(text: str, safety: dict[str, Any]) -> list[tuple[str, bool]]:
    """The reply's paragraphs, each marked when it holds one of the help lines `safety` lists
    (soulray serve writes each as "- name: contact")."""
    lines = [f"- {r['name']}: {r['contact']}" for r in safety.get("resources") or []]
    return [(p, any(line in p for line in lines)) for p in text.split("\n\n")]


def without_help_lines(text: str, safety: dict[str, Any] | None) -> str:
    """A flagged reply less the paragraph of help lines soulray serve put before it (or after
    its fixed safe reply): sent back as the assistant's turn, they would read as text the
    model wrote (and, with a strategy, as "[Strategy] If you are in crisis..."), which it was
    never trained on."""
    if not (safety and safety.get("flagged") and safety.get("resources")):
        return text
    kept = [p for p, is_help in help_paragraphs(text, safety) if not is_help]
    return "\n\n".join(kept).strip()  # "" when the model said nothing after them


def served_words(result: ChatResult, base_url: str) -> str:
    """The model's own words in a reply from `soulray serve`, whose crisis screen may put help
    lines before them (taken out here) or replace them with its fixed safe reply (an
    EndpointError: those are not the model's words, and synth must never store them as a
    role's turn). Other servers' replies are returned as they are."""
    safety = result.extra.get("safety")
    if not isinstance(safety, dict) or not safety.get("flagged"):
        return result.text
    help_at = [is_help for _, is_help in help_paragraphs(result.text, safety)]
    if safety.get("reply_replaced") or (any(help_at) and not help_at[0]):  # the fixed reply
        raise EndpointError(
            f"safety_replaced: {base_url} (soulray serve) answered with its crisis screen's "
            "fixed reply; serve a synth backend with serve.safety.enabled=false"
        )
    return without_help_lines(result.text, safety)


def endpoint_keys(endpoints: Iterable[EndpointConfig]) -> dict[str, str]:
    """The endpoints' API keys (variable -> value), read here on the driver for the Ray workers
    that call them: a key exported in the shell that starts a job is not in the environment of
    a running cluster's workers. Hand them over as task or actor arguments (`use_keys` there):
    a runtime_env's env_vars would show in Ray's state API and dashboard."""
    return {e.api_key_env: api_key(e) for e in endpoints if e.api_key_env}


def use_keys(keys: dict[str, str]) -> None:
    """In a worker: the keys `endpoint_keys` read on the driver, where build_client looks."""
    os.environ.update(keys)


def build_http_client(timeout_s: float) -> Any:
    """The SDK's aiohttp transport where this openai version has it (aiohttp comes with Ray):
    about half the CPU per request of the default httpx one, and a synth or eval job's own
    cost is mostly its requests. None (the SDK default) where it is missing."""
    import openai

    try:
        return openai.DefaultAioHttpClient(timeout=timeout_s)
    except (AttributeError, RuntimeError):  # an older SDK, or one without the aiohttp extra
        return None


def is_retryable(e: openai.APIError) -> bool:
    """Connection errors and timeouts (APITimeoutError is one) and RETRY_STATUS answers."""
    import openai

    if isinstance(e, openai.APIConnectionError):
        return True
    return isinstance(e, openai.APIStatusError) and e.status_code in RETRY_STATUS


def describe_error(e: openai.APIError, base_url: str) -> str:
    """A short reason a report can group by: 'timeout', 'connection', or 'http_<status>'."""
    import openai

    if isinstance(e, openai.APITimeoutError) and not refused(e):
        return f"timeout: {base_url} did not answer in time"
    if isinstance(e, openai.APIConnectionError):
        return f"connection: cannot reach {base_url}"
    if isinstance(e, openai.APIStatusError):
        return f"http_{e.status_code}: {e.message}"[:300]
    return f"api_error: {e}"[:300]


def reason_key(reason: str) -> str:
    """What a report groups a failure by: its label ('http_503'), not the server's message."""
    return reason.split(":", 1)[0].strip()


def refused(e: BaseException) -> bool:
    """A connection that failed at once, under any wrapper: the aiohttp transport reports a
    refused connection as a connect *timeout*, which would send users to the wrong fix."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 16:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(isinstance(x, TimeoutError) for x in chain):
        return False
    return any(isinstance(x, OSError) for x in chain)


def backoff_delay(attempt: int, base_s: float) -> float:
    """Exponential backoff with jitter: base * 2^attempt * [0.5, 1.0)."""
    return base_s * (2**attempt) * (0.5 + random.random() / 2)
