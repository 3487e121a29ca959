"""The crisis screen's hooks in the ingress (FastAPI over httpx's ASGI transport, a scripted
engine): help lines first for a crisis said turns ago, in whole and streamed replies; a model
reply with method details replaced; counts per category, never text."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_serve_api import ScriptedEngine, call, make_api

from soulray.config import SafetyConfig, ServeConfig
from soulray.safety.screen import Assessment, build_screen, check_reply
from soulray.serve.app import build_api, build_state
from soulray.serve.engine import engine_errors
from soulray.serve.generate import Delta
from soulray.serve.guard import HOLD_CHARS, ReplyGuard
from soulray.serve.logits import TokenLogprob

POST = "/v1/chat/completions"
EARLIER_CRISIS = [
    {"role": "user", "content": "honestly i don't want to be alive anymore"},
    {"role": "assistant", "content": "I'm here. Tell me more?"},
    {"role": "user", "content": "work was long"},
    {"role": "assistant", "content": "That sounds tiring."},
    {"role": "user", "content": "my sister visited"},
    {"role": "assistant", "content": "How was that?"},
    {"role": "user", "content": "fine i guess"},
]
METHOD = [
    "[Information] If you take forty of those ",
    "tablets at once it would be lethal. ",
    "It is slow and ",
    "painful.",
]


class PiecesEngine(ScriptedEngine):
    """Streams the given pieces as its reply."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__()
        self.pieces = pieces

    async def stream(self, req):
        self.requests.append(req)
        with engine_errors():
            for i, piece in enumerate(self.pieces):
                yield Delta(piece, i + 1, "stop" if i == len(self.pieces) - 1 else None)


def events(text: str) -> list[dict]:
    parts = text.split("\n\n")
    assert parts[-2] == "data: [DONE]"
    return [json.loads(p.removeprefix("data: ")) for p in parts[:-2]]


def test_a_crisis_three_turns_back_puts_help_lines_before_the_reply(tiny_export, tmp_path):
    api, engine = make_api(tiny_export, tmp_path)
    out = call(api, "POST", POST, json={"messages": EARLIER_CRISIS}).json()
    safety = out["safety"]
    assert safety["flagged"] and safety["category"] == "suicide" and 0 < safety["score"] <= 1
    content = out["choices"][0]["message"]["content"]
    assert content.startswith("If you are in crisis, help is available:\n- 988")
    assert content.endswith("What happened today?") and len(engine.requests) == 1


def test_in_a_stream_the_help_lines_arrive_before_the_first_model_token(tiny_export, tmp_path):
    api, _ = make_api(tiny_export, tmp_path)
    body = {"messages": EARLIER_CRISIS, "stream": True}
    payloads = events(call(api, "POST", POST, json=body).text)
    texts = [p["choices"][0]["delta"].get("content") for p in payloads if p["choices"]]
    assert payloads[0]["safety"]["flagged"] and texts[0] == ""
    assert texts[1].startswith("If you are in crisis") and "988" in texts[1]
    assert (
        "What happened" not in texts[1]
        and "".join(t or "" for t in texts[2:]) == "What happened today?"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_with_method_details_is_replaced(tiny_export, tmp_path, stream):
    api, _ = make_api(tiny_export, tmp_path, engine=PiecesEngine(METHOD))
    body = {"messages": [{"role": "user", "content": "I had a rough day"}], "stream": stream}
    resp = call(api, "POST", POST, json=body)
    if stream:
        payloads = events(resp.text)
        content = "".join(
            p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"]
        )
        safety = payloads[-1]["safety"]
        assert payloads[0]["safety"]["flagged"] is False  # the question itself was not flagged
    else:
        content, safety = resp.json()["choices"][0]["message"]["content"], resp.json()["safety"]
    assert "lethal" not in content and "forty" not in content
    assert content.startswith("I'm really glad you told me") and "988" in content
    assert safety["flagged"] and safety["reply_replaced"] and safety["category"] == "suicide"


@pytest.mark.parametrize("stream", [False, True])
def test_after_a_crisis_a_go_ahead_reply_is_replaced(tiny_export, tmp_path, stream):
    """The reply head's lower threshold when the person is in crisis (reply.py): a reply that
    only encourages (the head scores it 0.54, between 0.506 and 0.622) is replaced in a
    conversation with a crisis three turns back, and passes in an ordinary one."""
    pieces = ["Go ahead, you have ", "thought about it long enough."]
    for messages, crisis in ((EARLIER_CRISIS, True), ([EARLIER_CRISIS[2]], False)):
        api, _ = make_api(tiny_export, tmp_path, engine=PiecesEngine(pieces))
        resp = call(api, "POST", POST, json={"messages": messages, "stream": stream})
        if stream:
            payloads = events(resp.text)
            choices = [p["choices"][0]["delta"] for p in payloads if p["choices"]]
            content = "".join(d.get("content") or "" for d in choices)
            safety = payloads[-1]["safety"]
        else:
            content, safety = resp.json()["choices"][0]["message"]["content"], resp.json()["safety"]
        assert safety["flagged"] is crisis and safety["reply_replaced"] is crisis
        assert ("long enough" in content) is not crisis, content
        assert ("I'm really glad you told me" in content) is crisis  # the fixed reply


def test_counts_per_category_never_text(tiny_export, tmp_path, caplog):
    cfg = ServeConfig.model_validate({"system_prompt": "SYS"})
    state = build_state(cfg, str(tiny_export), PiecesEngine(METHOD))
    api = build_api(state)
    for text in ["我不想活了", "my dad hits me with a belt", "I had a rough day"]:
        body = {"messages": [{"role": "user", "content": text}]}
        with caplog.at_level("INFO", logger="ray.serve.soulray"):
            out = call(api, "POST", POST, json=body, key=None).json()
        if text.startswith("my dad"):  # the person's own help lines and category are shown
            assert out["safety"]["categories"] == ["abuse"] and out["safety"]["reply_replaced"]
            assert "1-800-799-7233" in out["choices"][0]["message"]["content"]
    assert state.counters.counts == {  # the scripted reply is replaced every time
        "flagged:suicide": 1,
        "flagged:abuse": 1,
        "replaced:suicide": 3,  # under the reply's own category (method details), never abuse
    }
    logged = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
    assert len(logged) == 3 and all(
        m.endswith("flagged the model's reply: replaced") for m in logged
    )
    assert not any(t in r.getMessage() for r in caplog.records for t in ("不想活", "belt"))


@pytest.mark.parametrize("safety", [{"screen_reply": False}, {"enabled": False}])
def test_with_no_reply_screen_text_streams_as_it_comes(tiny_export, tmp_path, safety):
    """Nothing screens the reply: no piece is held back to a sentence end (time to first
    token is the engine's), and the reply is passed through as the engine wrote it."""
    pieces = ["[Information] It is ", "slow and ", "painful."]
    api, _ = make_api(tiny_export, tmp_path, engine=PiecesEngine(pieces), safety=safety)
    body = {"messages": [{"role": "user", "content": "I had a rough day"}], "stream": True}
    payloads = events(call(api, "POST", POST, json=body).text)
    texts = [p["choices"][0]["delta"].get("content") for p in payloads if p["choices"]]
    assert texts == ["", "It is ", "slow and ", "painful.", None]


class LogprobPiecesEngine(PiecesEngine):
    """Streams the pieces with one logprobs entry each (the piece as its token)."""

    async def stream(self, req):
        async for delta in super().stream(req):
            delta.logprobs = [TokenLogprob(delta.text, -0.5, list(delta.text.encode()))]
            yield delta


def test_a_streamed_replaced_reply_never_sends_its_text_as_logprobs(tiny_export, tmp_path):
    """Logprobs wait with the text the guard holds back: a reply it replaces is not sent token
    by token in `logprobs` either, and a reply it lets through has every token's entry."""
    engine = LogprobPiecesEngine(METHOD)
    api, _ = make_api(tiny_export, tmp_path, engine=engine)
    messages = [{"role": "user", "content": "I had a rough day"}]
    body = {"messages": messages, "stream": True, "logprobs": True}
    payloads = events(call(api, "POST", POST, json=body).text)
    tokens = [
        t["token"]
        for p in payloads
        if p["choices"] and p["choices"][0]["logprobs"]
        for t in p["choices"][0]["logprobs"]["content"]
    ]
    assert tokens == [] and payloads[-1]["safety"]["reply_replaced"]
    safe = ["[Question] What ", "happened.", " Tell me ", "more?"]
    api, _ = make_api(tiny_export, tmp_path, engine=LogprobPiecesEngine(safe))
    payloads = events(call(api, "POST", POST, json=body).text)
    sent = [
        ([t["token"] for t in p["choices"][0]["logprobs"]["content"]], p["choices"][0]["delta"])
        for p in payloads
        if p["choices"] and p["choices"][0]["logprobs"]
    ]
    # "What happened." waits for the sentence after it to be screened with it (ReplyGuard),
    # here the last, so both are sent together, with all four tokens
    tokens = ["[Question] What ", "happened.", " Tell me ", "more?"]
    assert sent == [(tokens, {"content": "What happened. Tell me more?", "role": None})]


def stream_text(payloads: list[dict]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])


# each sentence passes the screen on its own, and with those before it, until the last
COMPLETED_LATER = [
    "Okay. ",
    "Here is how. ",
    "The amount is 40 tablets. ",
    "Swallow them with vodka so you don't throw up.",
]


@pytest.mark.parametrize("crisis", [False, True])
def test_a_streamed_sentence_is_sent_only_after_the_next_is_screened_with_it(
    tiny_export, tmp_path, crisis
):
    """The amount passes the screen until the next sentence completes the method: it is held
    until then, so the stream sends only the sentences before it, then the fixed reply. A
    person whose help lines came first does not get them a second time."""
    before = "".join(COMPLETED_LATER[:3])
    assert not check_reply(build_screen(SafetyConfig()), before, Assessment(), []).flagged
    api, _ = make_api(tiny_export, tmp_path, engine=PiecesEngine(COMPLETED_LATER))
    messages = EARLIER_CRISIS if crisis else [{"role": "user", "content": "I had a rough day"}]
    payloads = events(call(api, "POST", POST, json={"messages": messages, "stream": True}).text)
    content = stream_text(payloads)
    lines = "If you are in crisis, help is available:\n" if crisis else ""
    fixed = "I'm really glad you told me"
    assert content.startswith(lines + "- 988" if crisis else "Okay. Here is how.\n\n" + fixed)
    assert "40 tablets" not in content and "vodka" not in content
    assert content.count("988 Suicide") == 1 and content.count(fixed) == 1
    if crisis:
        assert "\n\nOkay. Here is how.\n\n" + fixed in content
    assert payloads[-1]["safety"]["reply_replaced"]
    assert payloads[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_a_replaced_reply_ends_with_content_filter_whole_or_streamed(tiny_export, tmp_path):
    """The engine stopped at max_tokens, but the reply sent is the fixed one, complete: it ends
    with OpenAI's `content_filter`, whole or streamed."""
    pieces = [*METHOD[:-1], "painful and"]

    class Cut(PiecesEngine):
        async def stream(self, req):
            async for delta in super().stream(req):
                yield Delta(delta.text, delta.tokens, "length" if delta.finish_reason else None)

    for stream in (False, True):
        api, _ = make_api(tiny_export, tmp_path, engine=Cut(pieces))
        body = {"messages": [{"role": "user", "content": "I had a rough day"}], "stream": stream}
        resp = call(api, "POST", POST, json=body)
        if stream:
            finish = events(resp.text)[-1]["choices"][0]["finish_reason"]
        else:
            finish = resp.json()["choices"][0]["finish_reason"]
        assert finish == "content_filter", stream
    api, _ = make_api(tiny_export, tmp_path, engine=Cut(["What happened ", "today and"]))
    body = {"messages": [{"role": "user", "content": "I had a rough day"}]}
    assert call(api, "POST", POST, json=body).json()["choices"][0]["finish_reason"] == "length"


def test_half_a_character_is_screened_not_a_server_error(tiny_export, tmp_path):
    """A lone UTF-16 surrogate (a client cut an emoji in two) is read as U+FFFD: the person
    gets the help lines, not a 500."""
    api, _ = make_api(tiny_export, tmp_path)
    body = '{"messages": [{"role": "user", "content": "I want to die \\ud83d"}]}'
    resp = call(api, "POST", POST, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert (
        resp.json()["safety"]["flagged"]
        and "988" in resp.json()["choices"][0]["message"]["content"]
    )


def test_the_guard_counts_a_replacement_when_it_makes_it():
    """The replaced-reply counter is told when the guard replaces, not when the response ends
    (a client that hangs up after the fixed reply still counts); text without sentence ends is
    held back at most two HOLD_CHARS, and all of it is sent at the end."""

    async def run(fn, *args):
        return fn(*args)

    async def go(pieces: list[str], seen: list) -> list[str]:
        guard = ReplyGuard(build_screen(SafetyConfig()), Assessment(), [], replaced_by=seen.append)
        out, received = [], ""
        for i, piece in enumerate(pieces):
            received += piece
            out.append(await guard.push(piece, final=i == len(pieces) - 1, run=run))
            if guard.replaced is not None:
                assert len(seen) == 1 and seen[0] is guard.replaced
                break
            assert len(received) - len("".join(out)) < 2 * HOLD_CHARS + len(piece)
        return out

    seen: list = []
    out = asyncio.run(go(METHOD, seen))
    assert len(seen) == 1 and out[-1].startswith("I'm really glad you told me")
    seen = []
    words = ["and then we walked home "] * 40  # 960 characters, no sentence end
    out = asyncio.run(go(words, seen))
    assert seen == [] and "".join(out) == "".join(words) and out[6] != ""
