"""Request and response models of the OpenAI chat-completions API, plus soulray's extensions.

The request model lists every field of OpenAI's chat-completions request (openai-python's
`CompletionCreateParams`), each one honoured, refused by `soulray.serve.params` with a 400
naming it, or accepted and ignored because it cannot change the reply; a field the API does not
have is refused by name (unless `serve.ignore_unknown_fields`). One extension: `strategy` asks
the model to answer with that support strategy. Responses add
`strategy` (the strategy the reply used, when the model was trained with strategy tags) and
`safety` (whether crisis language was detected, its category and score, and the help lines).
Every error is `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API returns.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from soulray.safety.screen import Assessment

Role = Literal["system", "developer", "user", "assistant"]


class APIError(Exception):
    """An error the client caused or must handle; rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(Lenient):
    type: str
    text: str | None = None  # required in a "text" part (as OpenAI's), checked by check_messages


class ChatMessage(BaseModel):
    """A message with every field OpenAI's message types have (a field they lack is refused by
    name, as in the request): `name`, and an earlier reply's `refusal` and `annotations` sent
    back, are accepted and ignored (the served chat templates have no speaker names); tool and
    audio fields are refused once set (soulray.serve.params.MESSAGE_REFUSED)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not 5, as OpenAI's API

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    # soulray's extension: the strategy an earlier reply was given with (the response's
    # `strategy`), sent back so a model trained with strategy tags sees its replies as trained
    strategy: str | None = None

    def text(self) -> str:
        """The message as plain text: text parts joined with a newline, as vLLM joins them (other
        parts are refused upstream). Joined with nothing, ["I want to die", "Nobody cares"] read
        "dienobody" to the crisis screen and to the model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is sent


MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string is matched against every row's text at every step


class ChatCompletionRequest(BaseModel):
    """Every field of OpenAI's request, in the groups soulray.serve.params handles them by.
    Strict types, as OpenAI's API: `"max_tokens": "5"` or `"stream": "yes"` is a 400 naming the
    field, not a guess."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Honoured by every engine (see the README's table of parameters per engine)
    model: str | None = None  # None = the served model
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: the top token alone, as OpenAI
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens
    stop: str | list[str] | None = None  # MAX_STOPS of MAX_STOP_CHARS at most
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a signed 64-bit int
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=128)  # bounded by serve.max_choices
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a string) -> -100..100
    # The vllm engine's structured output; refused by the hf and noop engines
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ignored without tools
    # Refused: the served model has no such capability (soulray.serve.params.REFUSED)
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None  # ["text"] is accepted
    functions: list[dict[str, Any]] | None = None  # deprecated by OpenAI: use tools
    function_call: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    # Accepted and ignored: they cannot change the reply (soulray.serve.params.IGNORED)
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    # soulray's extension
    strategy: str | None = None  # answer with this support strategy

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            # int('²') fails, int('٣') reads 3, and int() of 5,000 digits raises: no token id
            # has more than 10 digits
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"keys must be token ids (as strings); {key[:20]!r} is not one")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be between -100 and 100; {key!r} has {value}")
        return bias

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings (OpenAI's limit), got {len(stops)}")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                which = "the stop string" if isinstance(stop, str) else f"stop[{i}]"
                raise ValueError(f"{which} has {len(s)} characters; at most {MAX_STOP_CHARS}")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class HelpLineOut(BaseModel):
    name: str
    contact: str
    note: str = ""


class SafetyInfo(BaseModel):
    flagged: bool = False
    categories: list[str] = Field(default_factory=list)
    category: str | None = None  # the flagged category with the highest score
    score: float | None = None  # its score (1.0 when the lexicon matched)
    locale: str | None = None
    resources: list[HelpLineOut] = Field(default_factory=list)
    reply_replaced: bool = False  # the model's reply was flagged and replaced by the safe reply

    @classmethod
    def of(cls, a: Assessment, reply_replaced: bool = False) -> SafetyInfo:
        """The crisis screen's result as the response field."""
        return cls(
            flagged=a.flagged,
            categories=list(a.categories),
            category=a.category,
            score=a.score,
            locale=a.locale,
            resources=[
                HelpLineOut(name=h.name, contact=h.contact, note=h.note) for h in a.resources
            ],
            reply_replaced=reply_replaced,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """OpenAI's `choices[i].logprobs`: one entry per generated token."""

    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    strategy: str | None = None
    safety: SafetyInfo = Field(default_factory=SafetyInfo)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event. The first carries `safety`; `strategy` is set on every chunk once known."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    strategy: str | None = None
    safety: SafetyInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "soulray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: BaseModel | str) -> str:
    """One server-sent event line; `[DONE]` ends the stream."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"
