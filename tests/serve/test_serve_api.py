"""The ingress's HTTP API in-process (FastAPI over httpx's ASGI transport, a scripted engine):
OpenAI client compatibility, SSE framing, strategies, safety modes, every error path."""

from __future__ import annotations

import asyncio
import json
import shutil
from importlib import resources

import httpx
import pytest
from openai import AsyncOpenAI
from starlette.requests import ClientDisconnect

from soulray.config import ServeConfig
from soulray.endpoints import ChatResult, EndpointError, served_words, without_help_lines
from soulray.serve.app import build_api, build_state, load_api_key
from soulray.serve.engine import engine_errors
from soulray.serve.generate import Delta

KEY = "test-key-123"
REPLY = ["[Que", "stion] What ", "happened ", "today?"]


class ScriptedEngine:
    """Replies with REPLY in pieces; records what it was asked; can fail on demand."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.requests, self.fail = [], fail

    async def complete(self, req):
        text, last = "", None
        async for last in self.stream(req):
            text += last.text
        return [Delta(text, last.tokens, last.finish_reason)]

    async def stream(self, req):
        self.requests.append(req)
        with engine_errors():
            if self.fail is not None:
                raise self.fail
            for i, piece in enumerate(REPLY):
                yield Delta(piece, i + 1, "stop" if i == len(REPLY) - 1 else None)


HELPLINES = json.loads(
    resources.files("soulray.safety").joinpath("data/helplines.json").read_text("utf-8")
)


def help_paragraph(locale: str, category: str) -> str:
    """The help lines for `category` as the serve docs describe them: the locale's header,
    then each line for that category or for all ("- name: contact (note)")."""
    lines = [
        f"- {h['name']}: {h['contact']} ({h['note']})"
        for h in HELPLINES["resources"][locale]
        if not h["categories"] or category in h["categories"]
    ]
    return "\n".join([HELPLINES["header"][locale], *lines])


def make_api(tiny_export, tmp_path, engine=None, metrics=None, **serve):
    (tmp_path / "key").write_text(KEY + "\n")
    cfg = ServeConfig.model_validate(
        {"auth": {"api_key_file": str(tmp_path / "key")}, "system_prompt": "SYS", **serve}
    )
    engine = engine or ScriptedEngine()
    return build_api(build_state(cfg, str(tiny_export), engine), metrics), engine


def call(api, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers |= kwargs.pop("headers", {})
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def openai_client(api) -> AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api))
    return AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


def test_openai_client_whole_reply(tiny_export, tmp_path):
    api, engine = make_api(tiny_export, tmp_path)
    msgs = [{"role": "user", "content": "I had a rough day"}]

    async def go():
        return await openai_client(api).chat.completions.create(
            model="soulray", messages=msgs, max_tokens=20, temperature=0.0, seed=3
        )

    out = asyncio.run(go())
    assert out.choices[0].message.content == "What happened today?"
    assert out.choices[0].finish_reason == "stop"
    assert out.model_extra["strategy"] == "Question"
    assert out.model_extra["safety"]["flagged"] is False
    req = engine.requests[0]
    assert (req.max_tokens, req.temperature, req.seed) == (20, 0.0, 3)
    assert out.usage.prompt_tokens == len(req.prompt_ids) and out.usage.completion_tokens == 4


def test_openai_client_streamed_reply(tiny_export, tmp_path):
    api, _ = make_api(tiny_export, tmp_path)

    async def go():
        stream = await openai_client(api).chat.completions.create(
            model="soulray",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk async for chunk in stream]

    chunks = asyncio.run(go())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "What happened today?"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].model_extra["strategy"] == "Question"


def test_sse_framing_ends_with_done(tiny_export, tmp_path, caplog):
    api, _ = make_api(tiny_export, tmp_path)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with caplog.at_level("INFO", logger="ray.serve.soulray"):
        resp = call(api, "POST", "/v1/chat/completions", json=body)
    assert not [r for r in caplog.records if "went away" in r.getMessage()]  # read to its end
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    # no proxy may hold the stream back (nginx, the k8s ingress, buffers by default)
    assert (resp.headers["cache-control"], resp.headers["x-accel-buffering"]) == ("no-cache", "no")
    events = resp.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[0]["safety"] == {
        "flagged": False,
        "categories": [],
        "category": None,
        "score": None,
        "locale": None,
        "resources": [],
        "reply_replaced": False,
    }


def test_requested_strategy_is_forced_into_the_prompt(tiny_export, tmp_path):
    api, engine = make_api(tiny_export, tmp_path)
    body = {"messages": [{"role": "user", "content": "hi"}], "strategy": "reflection of feelings"}
    resp = call(api, "POST", "/v1/chat/completions", json=body)
    assert resp.json()["strategy"] == "Reflection of feelings"
    tok = build_state(ServeConfig(), str(tiny_export), engine).tokenizer
    assert tok.decode(engine.requests[0].prompt_ids).endswith(
        "<|im_start|>assistant\n[Reflection of feelings] "
    )
    unknown = call(api, "POST", "/v1/chat/completions", json={**body, "strategy": "Hugging"})
    assert assert_openai_error(unknown, 400)["param"] == "strategy"


def test_an_earlier_reply_sent_back_with_its_strategy_is_rendered_as_trained(tiny_export, tmp_path):
    """Training renders every reply of the context as "[Strategy] text"; the response strips
    the tag into `strategy`, and a client that sends it back (soulray chat does) gets it
    rendered again, so the model sees its earlier replies as it was trained."""
    api, engine = make_api(tiny_export, tmp_path)
    earlier = {"role": "assistant", "content": "What happened?", "strategy": "question"}
    turns = [{"role": "user", "content": "hi"}, earlier, {"role": "user", "content": "work"}]
    assert call(api, "POST", "/v1/chat/completions", json={"messages": turns}).status_code == 200
    tok = build_state(ServeConfig(), str(tiny_export), engine).tokenizer
    assert "<|im_start|>assistant\n[Question] What happened?<|im_end|>" in tok.decode(
        engine.requests[0].prompt_ids
    )
    for bad, says in (
        ({**earlier, "strategy": "Hugging"}, "messages[1]: unknown strategy 'Hugging'"),
        ({**turns[0], "strategy": "Question"}, "messages[0]: only an assistant message"),
    ):
        body = {"messages": list(turns)}
        body["messages"][0 if bad["role"] == "user" else 1] = bad
        error = assert_openai_error(call(api, "POST", "/v1/chat/completions", json=body), 400)
        assert error["message"].startswith(says)
        assert error["param"] == f"{says.split(':')[0]}.strategy"  # messages[i].strategy


@pytest.mark.parametrize("mode", ["augment", "fixed"])
def test_crisis_message_gets_resources_and_the_flag(tiny_export, tmp_path, mode):
    api, engine = make_api(tiny_export, tmp_path, safety={"mode": mode})
    body = {"messages": [{"role": "user", "content": "我真的不想活了"}]}
    out = call(api, "POST", "/v1/chat/completions", json=body).json()
    assert out["safety"]["flagged"] and out["safety"]["locale"] == "zh-CN"
    assert "12356" in out["choices"][0]["message"]["content"]
    assert len(engine.requests) == (1 if mode == "augment" else 0)
    streamed = call(api, "POST", "/v1/chat/completions", json={**body, "stream": True}).text
    assert "12356" in streamed and streamed.endswith("data: [DONE]\n\n")
    # `soulray chat` keeps what the model said (or the fixed reply), not the help lines
    content = out["choices"][0]["message"]["content"]
    kept = without_help_lines(content, out["safety"])
    assert "12356" not in kept and kept in content
    if mode == "augment":
        assert kept == "What happened today?"  # the scripted engine's reply, exactly
        assert content == f"{help_paragraph('zh-CN', 'suicide')}\n\n{kept}"
    else:  # the configured (built-in) fixed reply, then the zh-CN header and suicide lines
        assert kept == HELPLINES["fixed_reply"]["zh-CN"]
        assert content == f"{kept}\n\n{help_paragraph('zh-CN', 'suicide')}"
    # synth, with soulray serve as a role's backend, stores only the model's words
    result = ChatResult(content, 0, 0, extra={"safety": out["safety"]})
    if mode == "augment":
        assert served_words(result, "u") == "What happened today?"
    else:
        with pytest.raises(EndpointError, match="^safety_replaced: u"):
            served_words(result, "u")
    assert served_words(ChatResult("plain", 0, 0, extra={}), "u") == "plain"
    if mode == "augment":  # the model said nothing after the help lines: nothing is kept
        empty = content.removesuffix("What happened today?").rstrip()
        assert without_help_lines(empty, out["safety"]) == ""
        assert served_words(ChatResult(empty, 0, 0, extra={"safety": out["safety"]}), "u") == ""


@pytest.mark.parametrize("mode", ["augment", "fixed"])
def test_a_crisis_message_the_model_cannot_answer_still_gets_the_help_lines(
    tiny_export, tmp_path, mode
):
    """Too long for the context, or max_tokens too large: unflagged, a 400; flagged, the
    fixed safe reply with the help lines (a person in crisis never gets a bare error)."""
    api, engine = make_api(tiny_export, tmp_path, max_tokens_limit=64, safety={"mode": mode})
    post = "/v1/chat/completions"
    long = "I have been having a really hard time at work and at home. " * 200
    for crisis, plain, extra, refused in (
        (
            long + "I want to kill myself tonight.",
            long,
            {},
            ("messages", "context_length_exceeded"),
        ),
        (
            "I want to kill myself tonight.",
            "I had a long day.",
            {"max_tokens": 65},
            ("max_tokens", None),
        ),
    ):
        unflagged = {"messages": [{"role": "user", "content": plain}], **extra}
        error = assert_openai_error(call(api, "POST", post, json=unflagged), 400)
        assert (error["param"], error["code"]) == refused  # the limit, not another 400
        body = {"messages": [{"role": "user", "content": crisis}], **extra}
        out = call(api, "POST", post, json=body).json()
        assert out["safety"]["flagged"] and out["safety"]["category"] == "suicide"
        reply = out["choices"][0]["message"]["content"]
        assert reply.startswith("I'm really glad you told me") and "988" in reply  # the fixed one
        streamed = call(api, "POST", post, json={**body, "stream": True}).text
        assert "988" in streamed and streamed.endswith("data: [DONE]\n\n")
    assert engine.requests == []  # nothing was generated


@pytest.mark.parametrize("status", [503, 504])
def test_a_crisis_message_the_engine_cannot_answer_still_gets_the_help_lines(
    tiny_export, tmp_path, status
):
    """Overloaded or past its deadline: unflagged, the error; flagged, the fixed safe reply
    with the help lines, whole and streamed."""
    from soulray.serve.schemas import APIError

    failing = ScriptedEngine(fail=APIError(status, "the engine failed", type="overloaded"))
    api, _ = make_api(tiny_export, tmp_path, engine=failing)
    post = "/v1/chat/completions"
    plain = {"messages": [{"role": "user", "content": "I had a long day."}]}
    for stream in (False, True):
        error = assert_openai_error(
            call(api, "POST", post, json={**plain, "stream": stream}), status
        )
        assert error["message"] == "the engine failed"
    crisis = {"messages": [{"role": "user", "content": "I want to kill myself tonight."}]}
    out = call(api, "POST", post, json=crisis).json()
    assert out["safety"]["flagged"] and out["safety"]["category"] == "suicide"
    reply = out["choices"][0]["message"]["content"]
    assert reply.startswith("I'm really glad you told me") and reply.endswith(
        help_paragraph("en-US", "suicide")
    )
    streamed = call(api, "POST", post, json={**crisis, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == reply


def test_error_paths_are_openai_shaped_and_the_server_keeps_serving(tiny_export, tmp_path, caplog):
    api, _ = make_api(tiny_export, tmp_path, max_request_bytes=2048, max_tokens_limit=64)
    post = "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [  # (status, the error's param, the request)
        (400, None, dict(content=b"{not json")),
        (400, "messages", dict(json={"model": "soulray"})),
        (400, "messages", dict(json={"messages": []})),
        (400, "messages[0].role", dict(json={"messages": [{"role": "wizard", "content": "hi"}]})),
        (400, "messages", dict(json={"messages": [{"role": "assistant", "content": "hi"}]})),
        (400, "max_tokens", dict(json={**ok, "max_tokens": 65})),
        (400, "n", dict(json={**ok, "n": 9})),  # over serve.max_choices
        (400, "seed", dict(json={**ok, "seed": 2**64})),  # past a signed 64-bit int
        (400, "seed", dict(json={**ok, "seed": -(2**63) - 1})),
        (400, "logit_bias", dict(json={**ok, "logit_bias": {"²": 1}})),  # a digit, not an id
        (400, "logit_bias", dict(json={**ok, "logit_bias": {"٣": 1}})),
        (400, "logit_bias", dict(json={**ok, "logit_bias": {"9" * 50: 1}})),  # too many digits
        (400, "max_tokens", dict(json={**ok, "max_tokens": "5"})),  # strict types, as OpenAI
        (400, "stream", dict(json={**ok, "stream": "yes"})),
        (400, "stream_options", dict(json={**ok, "stream_options": {"include_usage": True}})),
        (400, "response_format.type", dict(json={**ok, "response_format": {"type": "bogus"}})),
        (
            415,
            "Content-Type",
            dict(content=b'{"messages": []}', headers={"content-type": "text/plain"}),
        ),
        (
            400,
            "messages[1].role",
            dict(json={"messages": [*ok["messages"], {"role": "system", "content": "late"}]}),
        ),
        (400, "stop", dict(json={**ok, "stop": ["a", "b", "c", "d", "e"]})),  # OpenAI's 4
        (  # a text part without its text (OpenAI refuses it; it read as "")
            400,
            "messages[0].content[1].text",
            dict(
                json={
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "text", "text": "hi"}, {"type": "text"}],
                        }
                    ]
                }
            ),
        ),
        (400, "stop", dict(json={**ok, "stop": ["ok", "x" * 257]})),
        (404, "model", dict(json={**ok, "model": "gpt-9"})),
        (413, None, dict(json={"messages": [{"role": "user", "content": "x" * 4000}]})),
    ]
    for status, param, kwargs in cases:
        with caplog.at_level("INFO", logger="ray.serve.soulray"):
            error = assert_openai_error(call(api, "POST", post, **kwargs), status)
        assert error["param"] == param, (kwargs, error)
        # the log says what was refused, never the message (it may quote the client's text)
        said = caplog.records[-1].getMessage()
        assert said == f"refused: {status} {error['type']} (param {param}, code {error['code']})"
    newer = assert_openai_error(
        call(api, "POST", post, json={**ok, "max_completion_tokens": 65}), 400
    )
    assert newer["param"] == "max_completion_tokens"  # the name the client used
    assert newer["message"] == "max_completion_tokens=65 is over this server's limit of 64"
    big = {"messages": [{"role": "user", "content": "x" * 4000}]}
    assert assert_openai_error(call(api, "POST", post, json=big), 413)["message"] == (
        "the request body is over this server's limit of 2048 bytes (serve.max_request_bytes)"
    )
    assert assert_openai_error(call(api, "POST", post, key="wrong", json=ok), 401)["code"] == (
        "invalid_api_key"
    )
    assert_openai_error(call(api, "POST", post, key=None, json=ok), 401)
    assert_openai_error(call(api, "GET", "/v1/models", key="wrong"), 401)
    assert_openai_error(call(api, "GET", "/nope"), 404)
    assert call(api, "GET", "/healthz", key=None).json() == {"status": "ok"}
    assert call(api, "POST", post, json=ok).status_code == 200
    assert call(api, "GET", "/v1/models").json()["data"][0]["id"] == "soulray"
    card = call(api, "GET", "/v1/models/soulray").json()
    assert (card["id"], card["object"], card["owned_by"]) == ("soulray", "model", "soulray")
    missing = assert_openai_error(call(api, "GET", "/v1/models/gpt-4o"), 404)
    assert (missing["param"], missing["code"]) == ("model", "model_not_found")
    unnamed = assert_openai_error(call(api, "POST", post, json={**ok, "model": ""}), 404)
    assert unnamed["code"] == "model_not_found"  # "" is a name no model has, as OpenAI's API
    assert_openai_error(call(api, "GET", "/v1/models/soulray", key="wrong"), 401)


def test_a_template_that_refuses_the_messages_is_a_400_with_its_words(tiny_export, tmp_path):
    """Many chat templates (Mistral's, Gemma's) raise_exception() on turns that do not
    alternate: that is the request's fault, not the server's."""
    strict = tmp_path / "strict"
    shutil.copytree(tiny_export, strict)
    template = strict / "chat_template.jinja"
    check = (
        "{%- for m in messages %}{%- if loop.index0 > 0 and m['role'] == "
        "messages[loop.index0 - 1]['role'] %}{{ raise_exception('Conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{%- endif %}{%- endfor %}"
    )
    template.write_text(check + template.read_text())
    api, engine = make_api(strict, tmp_path, system_prompt="")
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for stream in (False, True):
        resp = call(api, "POST", "/v1/chat/completions", json={"messages": twice, "stream": stream})
        error = assert_openai_error(resp, 400)
        assert error["message"] == (
            "the model's chat template refused these messages: Conversation roles must "
            "alternate user/assistant/user/assistant/..."
        )
        assert error["param"] == "messages"
    assert engine.requests == []
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    assert call(api, "POST", "/v1/chat/completions", json=ok).status_code == 200


def test_overload_is_503_and_crashes_never_leak(tiny_export, tmp_path):
    from ray.serve.exceptions import BackPressureError

    body = {"messages": [{"role": "user", "content": "hi"}]}
    api, _ = make_api(tiny_export, tmp_path, engine=ScriptedEngine(BackPressureError(9, 8)))
    for stream in (False, True):
        resp = call(api, "POST", "/v1/chat/completions", json={**body, "stream": stream})
        assert assert_openai_error(resp, 503)["code"] == "overloaded"
        assert resp.headers["retry-after"] == "1"
    api, _ = make_api(tiny_export, tmp_path, engine=ScriptedEngine(RuntimeError("SECRET hi")))
    resp = call(api, "POST", "/v1/chat/completions", json=body)
    assert assert_openai_error(resp, 500)["message"] == "internal server error"
    assert "SECRET" not in resp.text


class CountedRequests:
    """IngressMetrics with its request counter kept here instead of exported."""

    def __init__(self) -> None:
        self.requests, self.counts = self, {}

    def inc(self, value, tags):
        self.counts[tags["status"]] = self.counts.get(tags["status"], 0) + value


def test_a_cancelled_request_is_logged_as_a_hang_up_not_an_error(tiny_export, tmp_path, caplog):
    from ray.serve.exceptions import TaskCancelledError

    body = {"messages": [{"role": "user", "content": "hi"}]}
    metrics = CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, ScriptedEngine(TaskCancelledError()), metrics)
    with caplog.at_level("INFO", logger="ray.serve.soulray"):
        resp = call(api, "POST", "/v1/chat/completions", json=body)
    assert assert_openai_error(resp, 499)["type"] == "cancelled"
    assert metrics.counts == {"499": 1}  # counted as answered: no 5xx alert for a hang-up
    assert [r.levelname for r in caplog.records if "cancelled" in r.getMessage()] == ["INFO"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


class MidwayEngine(ScriptedEngine):
    """Streams the first two pieces of REPLY, then fails with `fail`."""

    async def stream(self, req):
        self.requests.append(req)
        with engine_errors():
            for i, piece in enumerate(REPLY[:2]):
                yield Delta(piece, i + 1, None)
            raise self.fail


def test_a_stream_that_fails_midway_is_counted_by_its_error_not_its_200(tiny_export, tmp_path):
    """The stream's 200 was sent before the engine failed: the client reads the error in the
    stream, and the request counter counts that error's status (what an error-rate alert sees)."""
    from soulray.serve.schemas import APIError

    post = "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    for fail, status in ((RuntimeError("SECRET"), "500"), (APIError(504, "too slow"), "504")):
        metrics = CountedRequests()
        engine = MidwayEngine(fail)  # the reply not held back to a sentence end: text is sent
        api, _ = make_api(tiny_export, tmp_path, engine, metrics, safety={"screen_reply": False})
        resp = call(api, "POST", post, json=body)
        assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
        assert "What " in resp.text and '"error"' in resp.text and "SECRET" not in resp.text
        whole = call(api, "POST", post, json={**body, "stream": False})  # the same, not streamed
        assert whole.status_code == int(status)
        assert metrics.counts == {status: 2}
    metrics = CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, metrics=metrics)
    assert call(api, "POST", post, json=body).status_code == 200
    assert metrics.counts == {"200": 1}


class EndlessEngine:
    """Streams a reply that never ends; counts its deltas and notes when its stream is closed
    (where a real engine frees the row: HFEngine.stream's `finally`)."""

    def __init__(self) -> None:
        self.sent, self.closed = 0, False

    async def stream(self, req):
        try:
            while True:
                self.sent += 1
                yield Delta("word ", self.sent, None)
                await asyncio.sleep(0)
        finally:
            self.closed = True


@pytest.mark.parametrize("hang_up_at", [1, 2, 3])
def test_a_client_gone_while_a_send_waits_closes_the_engine_stream(
    tiny_export, tmp_path, caplog, hang_up_at
):
    """The client goes away during a send (here the k-th body message; 2 = the help lines a
    crisis message gets before the reply): the engine's stream is closed by the time the
    response returns, not left generating until the garbage collector finds it."""
    engine, metrics = EndlessEngine(), CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, engine=engine, metrics=metrics)
    body = {"messages": [{"role": "user", "content": "我真的不想活了"}], "stream": True}
    request = json.dumps(body).encode()
    scope = stream_scope()
    bodies: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": request, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            if len(bodies) == hang_up_at:
                raise OSError("the client went away")

    async def go():
        with pytest.raises(ClientDisconnect) as gone:  # Starlette's, raised from our OSError
            await api(scope, receive, send)
        assert isinstance(gone.value.__context__, OSError)
        return engine.closed, engine.sent  # before the loop runs anything else

    with caplog.at_level("INFO", logger="ray.serve.soulray"):
        closed, sent = asyncio.run(go())
    assert len(bodies) == hang_up_at
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a hang-up, not an error
    gone = [r.getMessage() for r in caplog.records if "went away mid-stream" in r.getMessage()]
    assert len(gone) == 1 and gone[0].startswith("request chatcmpl-")
    if hang_up_at >= 2:
        assert b'"flagged":true' in bodies[0] and b"12356" in bodies[1]  # then the help lines
    assert closed and sent >= 1
    assert metrics.counts == {"499": 1}  # a hang-up, not the 200 its stream began with


def test_a_stream_serve_cancels_midway_is_counted_as_a_hang_up(tiny_export, tmp_path):
    """Serve cancels the request of a client that hung up mid-stream (the task's
    CancelledError, not an Exception): counted as 499, not as the 200 already sent."""
    metrics = CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, engine=EndlessEngine(), metrics=metrics)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(api(stream_scope(), receive, send))
    assert metrics.counts == {"499": 1}


@pytest.mark.parametrize("end", ["disconnect", "cancelled"])
def test_a_stream_whose_client_went_away_is_counted_as_a_hang_up(tiny_export, tmp_path, end):
    """A client that hangs up mid-stream, as the app hears it: an http.disconnect, which
    Starlette ends the stream on without an error (the counter saw the 200 the stream began
    with: 3 of 8 hang-ups on a served app); or, since Serve cancels the request and with it
    (recursively) the replica's pending call for the next ASGI message, a TaskCancelledError out
    of `receive`, which escaped the app after Serve had cancelled the future that would have
    collected it ("Task exception was never retrieved" in the replica log, 9 of 60 hang-ups).
    Both end the stream as a hang-up: the app returns, the engine's stream is closed, 499."""
    from ray.serve.exceptions import TaskCancelledError

    engine, metrics = EndlessEngine(), CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, engine=engine, metrics=metrics)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    received = 0

    async def receive():
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.sleep(0.2)  # the stream has begun
        if end == "cancelled":
            raise TaskCancelledError()  # as Serve's ASGIReceiveProxy raises it
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = stream_scope() | {"asgi": {"version": "3.0", "spec_version": "2.3"}}  # as Serve's
    asyncio.run(asyncio.wait_for(api(scope, receive, send), 30))  # returns: no error to see
    assert sent[0]["status"] == 200 and not [m for m in sent if m.get("more_body") is False]
    assert engine.closed
    assert metrics.counts == {"499": 1}


def test_a_stream_that_crashes_is_counted_as_a_500_not_a_hang_up(
    tiny_export, tmp_path, monkeypatch, caplog
):
    """A bug that escapes the stream after its 200 (here in its last chunk) is a 500 in the
    counter, not a client that went away (the diff review's: the hang-up rule first took it
    for one)."""
    import soulray.serve.chat as chat

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the last chunk")

    monkeypatch.setattr(chat, "_guarded_safety", broken)
    metrics = CountedRequests()
    api, _ = make_api(tiny_export, tmp_path, ScriptedEngine(), metrics)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with caplog.at_level("INFO", logger="ray.serve.soulray"):
        call(api, "POST", "/v1/chat/completions", json=body)
    assert metrics.counts == {"500": 1}
    assert "internal error: RuntimeError" in caplog.text
    assert "went away" not in caplog.text


def stream_scope() -> dict:
    """An ASGI scope of an authorized chat request."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},  # a send to a gone client raises
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"host", b"t")],
        "server": ("t", 80),
        "client": ("c", 1),
    }


def test_api_key_sources(tmp_path, monkeypatch):
    from soulray.config import AuthConfig

    monkeypatch.setenv("MY_KEY", "from-env")
    assert load_api_key(AuthConfig(api_key_env="MY_KEY")) == "from-env"
    (tmp_path / "k").write_text("from-file\n")
    assert load_api_key(AuthConfig(api_key_env="MY_KEY", api_key_file=str(tmp_path / "k"))) == (
        "from-file"
    )
    monkeypatch.delenv("MY_KEY")
    assert load_api_key(AuthConfig(api_key_env="MY_KEY")) is None
    with pytest.raises(ValueError, match="MY_KEY"):
        load_api_key(AuthConfig(api_key_env="MY_KEY", required=True))
    missing = tmp_path / "not-mounted"
    with pytest.raises(ValueError) as e:
        load_api_key(AuthConfig(api_key_env="MY_KEY", api_key_file=str(missing)))
    assert str(e.value) == (
        f"serve.auth.api_key_file {missing} does not exist or is empty, and the environment "
        "variable MY_KEY is not set: the server would run without auth; put the key in that "
        "file, or unset serve.auth.api_key_file to serve openly"
    )
    monkeypatch.setenv("MY_KEY", "from-env")  # the variable still serves when the file is gone
    assert load_api_key(AuthConfig(api_key_env="MY_KEY", api_key_file=str(missing))) == "from-env"
    monkeypatch.delenv("MY_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ as replicas expand it: `soulray serve`
    assert load_api_key(AuthConfig(api_key_env="MY_KEY", api_key_file="~/k")) == "from-file"


@pytest.mark.parametrize("debug", [False, True])
def test_message_text_is_logged_only_with_the_debug_flag(tiny_export, tmp_path, caplog, debug):
    api, _ = make_api(tiny_export, tmp_path, debug_log_content=debug)
    secret = "my-private-words-42"
    with caplog.at_level("DEBUG", logger="ray.serve.soulray"):
        body = {"messages": [{"role": "user", "content": secret}]}
        assert call(api, "POST", "/v1/chat/completions", json=body).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "request chatcmpl-" in logged  # ids and sizes are always logged
    assert (secret in logged) is debug


@pytest.mark.parametrize("wrapped", [False, True])
def test_engine_errors_become_openai_errors(tiny_export, tmp_path, wrapped):
    """A deadline or a failed prefill on the engine reaches the client as the error it is,
    also when Ray delivers it wrapped in a RayTaskError (the engine is another process)."""
    from ray.exceptions import RayTaskError

    from soulray.serve.scheduler import EngineError

    error: Exception = EngineError(504, "past the limit (serve.engine.request_timeout_s)", "t/o")
    if wrapped:
        error = RayTaskError("stream", "traceback text", error)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    api, _ = make_api(tiny_export, tmp_path, engine=ScriptedEngine(error))
    resp = call(api, "POST", "/v1/chat/completions", json=body)
    got = assert_openai_error(resp, 504)
    assert got == {
        "message": "past the limit (serve.engine.request_timeout_s)",
        "type": "server_error",
        "param": None,
        "code": "t/o",
    }


def test_unknown_fields_are_refused_unless_the_server_ignores_them(tiny_export, tmp_path):
    body = {"messages": [{"role": "user", "content": "hi"}], "legacy_flag": True}
    api, _ = make_api(tiny_export, tmp_path)
    refused = assert_openai_error(call(api, "POST", "/v1/chat/completions", json=body), 400)
    assert (refused["param"], refused["code"]) == ("legacy_flag", "unknown_parameter")
    api, engine = make_api(tiny_export, tmp_path, ignore_unknown_fields=True)
    assert call(api, "POST", "/v1/chat/completions", json=body).status_code == 200
    assert len(engine.requests) == 1
