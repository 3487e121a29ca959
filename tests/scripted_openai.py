"""A scripted OpenAI-compatible HTTP server for tests (and benchmarks): real HTTP, canned answers.

The test hands it a `responder(body) -> str | Reply` that sees each request's JSON body and
decides the answer, so a test can play several roles from one server and assert on what was
asked (`server.requests`). Runs aiohttp on its own thread and event loop, on a free port.

    with ScriptedOpenAI(lambda body: "hello") as server:
        client = openai.OpenAI(base_url=server.url, api_key="x")
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

WORD = re.compile(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+")


@dataclass
class Reply:
    text: str = ""
    status: int = 200  # non-200 answers {"error": {"message": text}}
    delay_s: float = 0.0  # wait before answering (timeouts, slow endpoints)
    completion_tokens: int | None = None  # None = counted from the text
    stream_error: str | None = None  # streamed: the text, then this error inside the stream
    raw: bytes | None = None  # a 200 with exactly this body, labelled application/json


Responder = Callable[[dict[str, Any]], "str | Reply"]


def count_tokens(text: str) -> int:
    """A stand-in token count: words, and each CJK character as one."""
    return len(WORD.findall(text))


class ScriptedOpenAI:
    """POST /v1/chat/completions and GET /v1/models, answered by `responder`."""

    def __init__(self, responder: Responder, model: str = "scripted", port: int = 0):
        self.responder = responder
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # each request's Authorization header
        self.model_lists = 0  # GET /v1/models requests answered
        self.in_flight = 0  # requests being answered now (touched only on the server's loop)
        self.peak_in_flight = 0
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> ScriptedOpenAI:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted OpenAI server did not start in 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ScriptedOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start_site())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start_site(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # the port the OS chose

    async def _models(self, request: web.Request) -> web.Response:
        self.model_lists += 1
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "test"}],
            }
        )

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        answer = self.responder(body)
        reply = answer if isinstance(answer, Reply) else Reply(answer)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        self.in_flight -= 1
        if reply.raw is not None:
            return web.Response(body=reply.raw, content_type="application/json")
        if reply.status != 200:
            error = {"message": reply.text or "scripted error", "type": "scripted"}
            return web.json_response({"error": error}, status=reply.status)
        if body.get("stream"):
            return await self._stream(request, reply)
        prompt = sum(count_tokens(m.get("content") or "") for m in body.get("messages", []))
        completion = reply.completion_tokens
        completion = count_tokens(reply.text) if completion is None else completion
        return web.json_response(completion_body(self.model, reply.text, prompt, completion))

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        """Server-sent events as OpenAI streams them: one chunk per word, then [DONE] (or,
        with `stream_error`, an error event the way servers report one mid-stream)."""
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0}
        for piece in WORD.findall(reply.text):
            delta = {"index": 0, "delta": {"content": piece + " "}, "finish_reason": None}
            chunk = base | {"model": self.model, "choices": [delta]}
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if reply.stream_error:
            error = {"message": reply.stream_error, "type": "server_error"}
            await out.write(f"data: {json.dumps({'error': error})}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


def completion_body(model: str, text: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
