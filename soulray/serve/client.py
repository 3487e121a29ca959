"""`soulray chat`: a terminal client for any OpenAI-compatible endpoint (multi-turn, streaming).

It uses the official `openai` package, so what works here works with any OpenAI client. soulray's
extension fields are shown when present: the strategy of each reply, and the help lines attached
to a flagged message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from soulray.endpoints import without_help_lines

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}


def build_client(url: str, api_key: str | None) -> Any:
    from openai import OpenAI

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else f"{base}/v1"
    key = api_key or os.environ.get("SOULRAY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    return OpenAI(base_url=base, api_key=key, max_retries=1, timeout=300)


def pick_model(client: Any, model: str | None) -> str:
    """The requested model, or the first one the server lists."""
    if model:
        return model
    listed = client.models.list().data
    if not listed:
        raise ValueError("the server lists no models; pass --model")
    return listed[0].id


def stream_reply(
    client: Any, model: str, messages: list[dict[str, str]], max_tokens: int, out: TextIO
) -> tuple[str, str | None]:
    """Send the conversation, print the reply as it streams; return its text as the
    conversation keeps it (without the help lines the server put around it) and the strategy
    soulray gave it (None from other servers)."""
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True
    )
    text, strategy, safety = "", None, None
    for chunk in stream:
        extra = chunk.model_extra or {}
        strategy = extra.get("strategy") or strategy
        safety = extra.get("safety") or safety
        for choice in chunk.choices:
            piece = choice.delta.content or ""
            text += piece
            out.write(piece)
            out.flush()
    out.write("\n")
    if strategy:
        out.write(f"  [strategy: {strategy}]\n")
    if safety and safety.get("flagged"):
        out.write(f"  [safety: flagged {', '.join(safety.get('categories', []))}]\n")
    return without_help_lines(text, safety), strategy


def run_chat(
    url: str,
    model: str | None,
    api_key: str | None,
    max_tokens: int,
    lines: Iterable[str] | None = None,
    out: TextIO = sys.stdout,
    prompt: Callable[[str], str] = input,
) -> list[dict[str, str]]:
    """Multi-turn chat until EOF or /exit; `lines` replaces the keyboard (one message each).
    A server error (503 overloaded, 400 too long, an error in the stream) is shown and that
    message taken back, and the chat goes on; an unreachable server ends it."""
    import openai

    client = build_client(url, api_key)
    name = pick_model(client, model)
    out.write(f"chatting with {name} at {url} (Ctrl-D or /exit to leave)\n")
    messages: list[dict[str, str]] = []
    feed = iter(lines) if lines is not None else None
    while True:
        try:
            said = next(feed) if feed is not None else prompt("you> ")
        except (EOFError, StopIteration):
            out.write("\n")
            break
        if said.strip() in EXIT_WORDS:
            break
        if not said.strip():
            continue
        messages.append({"role": "user", "content": said})
        out.write("bot> ")
        try:
            reply, strategy = _reply_dropping_oldest(client, name, messages, max_tokens, out)
        except openai.APIConnectionError:
            raise
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            body = e.body.get("message") if isinstance(e.body, dict) else None  # the server's
            out.write(f"\n  [error{f' {status}' if status else ''}: {body or e.message}]\n")
            out.write("  (that message was not kept; send it again or another)\n")
            messages.pop()
            continue
        # sent back with its strategy, a strategy-tagged model sees the reply as it was trained
        messages.append({"role": "assistant", "content": reply})
        if strategy:
            messages[-1]["strategy"] = strategy
    return messages


def _too_long(e: Exception) -> bool:
    """The server's refusal of a conversation for its size (serve.max_request_bytes,
    serve.max_messages), which fewer old turns cure."""
    import openai

    if not isinstance(e, openai.APIStatusError):
        return False
    code = e.body.get("code") if isinstance(e.body, dict) else None
    return e.status_code == 413 or code == "too_many_messages"


def _reply_dropping_oldest(
    client: Any, name: str, messages: list[dict[str, str]], max_tokens: int, out: TextIO
) -> tuple[str, str | None]:
    """stream_reply; a conversation the server refuses for its size is sent again without its
    oldest exchange, until the newest message alone is left. The history loses them only once a
    send succeeds: a newest message too big by itself is refused with the history kept. The
    server keeps only the newest turns that fit the context anyway; without this, every later
    message of a long chat was refused."""
    sent, dropped = list(messages), 0
    while True:
        try:
            got = stream_reply(client, name, sent, max_tokens, out)
        except Exception as e:
            if not _too_long(e) or len(sent) <= 1:
                raise
            del sent[: 2 if len(sent) > 2 else 1]  # a user turn and its reply
            dropped += 1
            continue
        if dropped:
            del messages[: len(messages) - len(sent)]
            out.write(f"\n  [the server's size limit: dropped the {dropped} oldest exchange(s)]\n")
        return got


def ask_once(
    url: str, text: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 64
) -> Any:
    """One non-streamed request (e.g. the quickstart's last step); returns the completion,
    with soulray's `strategy` and `safety` in `model_extra`."""
    client = build_client(url, api_key)
    return client.chat.completions.create(
        model=pick_model(client, model),
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
    )
