"""What each OpenAI chat-completions parameter does on each engine: honoured, refused, ignored.

A client that asks for something and silently gets something else is worse off than one that
gets an error, so every field of the request model is in exactly one of these groups (a test
checks it against openai-python's request type):
- honoured by every engine (`schemas.ChatCompletionRequest`'s first group; the noop engine's
  fixed reply is the same whatever the sampling fields say, and it has no logprobs);
- `VLLM_ONLY`: the vllm engine's structured output; the hf and noop engines refuse them with a
  400 that names the parameter and the engine that supports it;
- `REFUSED`: no engine here can do it (a 400 naming it);
- `IGNORED`: accepted because it cannot change the reply (who asked, billing, caching).
A field the API does not have is refused by name too, unless `serve.ignore_unknown_fields`.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from soulray.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    StreamOptions,
)

log = logging.getLogger("ray.serve.soulray")

HONOURED = {
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
    "seed", "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias",
}  # fmt: skip
EXTENSIONS = {"strategy": "soulray: answer with this support strategy"}
VLLM_ONLY = {
    "response_format": "JSON mode and JSON schemas (structured output)",
}
REFUSED = {
    "tools": "tool calling is not served yet: soulray's vllm path sends vLLM prompt ids, not "
    "the chat messages its tool parser needs",
    "tool_choice": "tool calling is not served (see `tools`)",
    "audio": "the served models write text only",
    "modalities": 'the served models write text only; omit it or send ["text"]',
    "functions": "deprecated by OpenAI in favour of `tools`, which is not served either",
    "function_call": "deprecated by OpenAI in favour of `tool_choice`; not served",
    "reasoning_effort": "the served models are not reasoning models",
    "verbosity": "the served models have no verbosity control",
    "web_search_options": "there is no web search here",
    "moderation": "replies are screened by soulray's crisis screen (serve.safety), not OpenAI's",
}
MESSAGE_REFUSED = ("tool_calls", "tool_call_id", "function_call", "audio")
IGNORED = {
    "user": "an end-user id for OpenAI's abuse monitoring",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "metadata": "tags for OpenAI's stored completions",
    "store": "OpenAI's stored completions",
    "service_tier": "OpenAI's processing tiers",
    "prediction": "predicted outputs only make OpenAI's reply faster, never different",
    "prompt_cache_key": "OpenAI's prompt cache",
    "prompt_cache_options": "OpenAI's prompt cache",
    "prompt_cache_retention": "OpenAI's prompt cache",
    "parallel_tool_calls": "only has a meaning with tools",
}


def parse_chat_request(data: dict[str, Any], ignore_unknown: bool) -> ChatCompletionRequest:
    """The request model; a field OpenAI's API does not have is a 400 naming it, or is dropped
    (and logged) when `serve.ignore_unknown_fields` is set for a legacy client."""
    unknown = unknown_fields(data)
    if unknown and not ignore_unknown:
        raise APIError(
            400,
            f"unknown parameter {unknown[0]!r}: it is not a field of the OpenAI "
            "chat-completions API; remove it (or, for a legacy client, set "
            "serve.ignore_unknown_fields=true on the server)",
            param=unknown[0],
            code="unknown_parameter",
        )
    if unknown:
        log.info("ignored unknown request fields %s (serve.ignore_unknown_fields)", unknown)
        data = without_unknown(data)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # a union's members each report (content: "a valid string" and the list's part error):
        # the one that reached deepest is about what was sent ("messages[0].content[0].type")
        loc = errors[0]["loc"]
        parent = loc[:-1] if len(loc) > 1 else loc  # the field whose members reported
        first = max(
            (x for x in errors if x["loc"][: len(parent)] == parent), key=lambda x: len(x["loc"])
        )
        where = field_path(first["loc"], unknown=first["type"] == "extra_forbidden")
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None


def field_path(loc: tuple[Any, ...], unknown: bool = False) -> str:
    """A validation error's location as the request's own path, `messages[0].content[0].type`:
    list indices in brackets, and pydantic's union-member tags (`content.list[ContentPart]`) and
    mapping keys left out; `unknown`:
    the last part is a key the request may not have (`stream_options.zzz`)."""
    fields = set(ChatCompletionRequest.model_fields) | set(ChatMessage.model_fields)
    fields |= set(StreamOptions.model_fields) | set(ContentPart.model_fields)
    path = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in fields or (unknown and k == len(loc) - 1):
            path += f".{part}" if path else str(part)
        # else a union member's tag ("str", "list[ContentPart]") or a mapping's key: left out
    return path or "body"


OPTION_FIELDS = set(StreamOptions.model_fields)


def unknown_fields(data: dict[str, Any]) -> list[str]:
    """Fields of the request, and of its messages, that OpenAI's API does not have."""
    known = set(ChatMessage.model_fields)
    found = sorted(set(data) - set(ChatCompletionRequest.model_fields))
    options = data.get("stream_options")
    if isinstance(options, dict):
        found += [f"stream_options.{k}" for k in sorted(set(options) - OPTION_FIELDS)]
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict):
            found += [f"messages[{i}].{k}" for k in sorted(set(m) - known)]
    return found


def without_unknown(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k in ChatCompletionRequest.model_fields}
    if isinstance(out.get("stream_options"), dict):
        out["stream_options"] = {
            k: v for k, v in out["stream_options"].items() if k in OPTION_FIELDS
        }
    if isinstance(out.get("messages"), list):
        known = set(ChatMessage.model_fields)
        out["messages"] = [
            {k: v for k, v in m.items() if k in known} if isinstance(m, dict) else m
            for m in out["messages"]
        ]
    return out


def check_params(req: ChatCompletionRequest, engine: str, vocab: int, max_choices: int) -> None:
    """Refuse, with a 400 naming it, any parameter this engine cannot honour."""
    for i, message in enumerate(req.messages):
        for name in MESSAGE_REFUSED:
            if getattr(message, name):
                raise _unsupported(
                    f"messages[{i}].{name}",
                    f"messages[{i}].{name} is not supported: tool calling and audio are not "
                    "served (see `tools`)",
                )
    for name, why in REFUSED.items():
        value = getattr(req, name)
        if name == "modalities" and value in (None, ["text"]):
            continue
        if name == "tool_choice" and value in (None, "none") and not req.tools:
            continue  # "none" without tools asks for nothing
        if value is not None:
            raise _unsupported(name, f"{name} is not supported: {why}")
    if req.stream_options is not None and not req.stream:
        raise _unsupported(
            "stream_options", "stream_options is only allowed with stream=true", "invalid_value"
        )
    kind = "text" if req.response_format is None else req.response_format.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _unsupported(
            "response_format.type",
            "response_format.type must be 'text', 'json_object' or 'json_schema'"
            + ("" if kind is None else f", not {kind!r}"),
            "invalid_value",
        )
    for name, what in VLLM_ONLY.items():
        value = getattr(req, name)
        if name == "response_format" and value is not None and value.get("type") == "text":
            continue  # plain text is every engine's default
        if value is not None and engine != "vllm":
            raise _unsupported(
                name,
                f"{name} ({what}) is not supported by the {engine} engine; the vllm engine "
                "supports it (serve.engine.kind=vllm)",
            )
    if req.top_logprobs is not None and not req.logprobs:
        raise _unsupported("top_logprobs", "top_logprobs needs logprobs=true", "invalid_value")
    if req.logprobs and engine == "noop":
        raise _unsupported(
            "logprobs",
            "logprobs is not supported by the noop engine (a fixed reply, no model); the hf "
            "and vllm engines support it",
        )
    if (req.n or 1) > max_choices:
        raise _unsupported(
            "n",
            f"n={req.n} is over this server's limit of {max_choices} (serve.max_choices)",
            "invalid_value",
        )
    for key in req.logit_bias or {}:
        if int(key) >= vocab:
            raise _unsupported(
                "logit_bias",
                f"logit_bias names token id {key}, outside this model's vocabulary of {vocab}",
                "invalid_value",
            )


def sampling_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    """The GenRequest fields beyond the basic ones: choices, logprobs, penalties, bias, and the
    vllm engine's structured output."""
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    format_ = req.response_format if (req.response_format or {}).get("type") != "text" else None
    return {
        "n": req.n or 1,
        "logprobs": logprobs,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": {int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        "vllm_only": {"response_format": format_} if format_ else {},
    }


def _unsupported(param: str, message: str, code: str = "unsupported_parameter") -> APIError:
    return APIError(400, message, param=param, code=code)
