"""`soulray chat` against a scripted OpenAI-compatible server over real HTTP: a server error,
in the response or in the stream, is shown and that message taken back; the chat goes on."""

from __future__ import annotations

import io

from scripted_openai import Reply, ScriptedOpenAI

from soulray.serve.client import run_chat


def test_server_errors_are_shown_and_the_chat_goes_on() -> None:
    answers = {
        "first": Reply("overloaded", status=503),
        "second": Reply("I hear", stream_error="request timed out after 300 s"),
        "third": "That sounds hard",
    }
    with ScriptedOpenAI(lambda body: answers[body["messages"][-1]["content"]]) as server:
        out = io.StringIO()
        kept = run_chat(server.url, None, None, 32, ["first", "second", "third"], out)
        asked = [[m["content"] for m in r["messages"]] for r in server.requests]
    # the failed messages were not kept: each request carries only what the server answered
    # (the client retries a 503 once before it gives up)
    assert asked == [["first"], ["first"], ["second"], ["third"]]
    assert kept == [
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "That sounds hard "},
    ]
    text = out.getvalue()
    assert "[error 503: overloaded]" in text
    assert "[error: request timed out after 300 s]" in text
    assert text.count("(that message was not kept; send it again or another)") == 2
    assert text.endswith("That sounds hard \n\n")  # the reply, then a newline at the end


def test_a_conversation_too_big_for_the_server_drops_its_oldest_exchanges() -> None:
    """serve.max_request_bytes (413) and serve.max_messages refused every later message of a
    long chat: the client drops its oldest exchange and sends again, and says so."""

    def answer(body):
        if len(body["messages"]) > 3:
            return Reply("the request body is over this server's limit", status=413)
        return f"ok {body['messages'][-1]['content']}"

    with ScriptedOpenAI(answer) as server:
        out = io.StringIO()
        kept = run_chat(server.url, None, None, 32, ["a", "b", "c", "d"], out)
        asked = [[m["content"] for m in r["messages"]] for r in server.requests]
    assert asked[-2:] == [["b", "ok b ", "c", "ok c ", "d"], ["c", "ok c ", "d"]]
    assert [m["content"] for m in kept] == ["c", "ok c ", "d", "ok d "]
    text = out.getvalue()
    assert text.count("[the server's size limit: dropped the 1 oldest exchange(s)]") == 2
    assert "[error" not in text


def test_a_message_too_big_by_itself_is_refused_and_the_history_kept() -> None:
    def answer(body):
        if len(body["messages"][-1]["content"]) > 50:
            return Reply("the request body is over this server's limit", status=413)
        return f"ok {len(body['messages'])}"

    with ScriptedOpenAI(answer) as server:
        out = io.StringIO()
        kept = run_chat(server.url, None, None, 32, ["a", "x" * 60, "b"], out)
        asked = [len(r["messages"]) for r in server.requests]
    assert [m["content"] for m in kept] == ["a", "ok 1 ", "b", "ok 3 "]
    assert asked[-1] == 3  # "a", its reply and "b": nothing of the history was lost
    assert "[error 413: the request body is over this server's limit]" in out.getvalue()
    assert "dropped" not in out.getvalue()
