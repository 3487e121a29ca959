"""The shared endpoint client over real HTTP: answers, retries, give-ups, the concurrency bound."""

from __future__ import annotations

import asyncio

import pytest
from scripted_openai import Reply, ScriptedOpenAI
from soulray_testing import free_port

from soulray.endpoints import (
    ChatResult,
    EndpointConfig,
    EndpointError,
    build_client,
    build_clients,
    close_all,
)

HELLO = [{"role": "user", "content": "hello there"}]


def run_chat(cfg: EndpointConfig, messages=HELLO, **overrides):
    async def go():
        client = build_client(cfg, backoff_s=0.01)
        try:
            return await client.chat(messages, **overrides), client.retries
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_answer_usage_and_request_fields() -> None:
    with ScriptedOpenAI(lambda body: "I hear you, that sounds hard") as server:
        cfg = EndpointConfig(base_url=server.url, model="m1", temperature=0.2, max_tokens=40)
        result, retries = run_chat(cfg, max_tokens=7)
    assert (result.text, result.prompt_tokens, result.completion_tokens) == (
        "I hear you, that sounds hard",
        2,
        6,
    )
    assert retries == 0
    body = server.requests[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("m1", 0.2, 7)
    assert body["messages"] == HELLO


def test_429_and_503_are_retried_then_answered() -> None:
    answers = iter([Reply("slow down", status=429), Reply("busy", status=503), Reply("ok")])
    with ScriptedOpenAI(lambda body: next(answers)) as server:
        result, retries = run_chat(EndpointConfig(base_url=server.url, model="m"))
    assert (result.text, retries, len(server.requests)) == ("ok", 2, 3)


def test_retries_exhausted_raise_the_last_reason() -> None:
    with ScriptedOpenAI(lambda body: Reply("overloaded", status=503)) as server:
        cfg = EndpointConfig(base_url=server.url, model="m", max_retries=2)
        with pytest.raises(EndpointError) as err:
            run_chat(cfg)
    assert err.value.reason.startswith("http_503")
    assert len(server.requests) == 3


def test_a_400_is_not_retried() -> None:
    with (
        ScriptedOpenAI(lambda body: Reply("bad request", status=400)) as server,
        pytest.raises(EndpointError) as err,
    ):
        run_chat(EndpointConfig(base_url=server.url, model="m"))
    assert err.value.reason.startswith("http_400")
    assert len(server.requests) == 1


def test_refused_connection_and_timeout_give_their_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(EndpointError) as refused:
        run_chat(EndpointConfig(base_url=url, model="m", max_retries=1))
    assert refused.value.reason == f"connection: cannot reach {url}"
    with ScriptedOpenAI(lambda body: Reply("late", delay_s=2.0)) as server:
        cfg = EndpointConfig(base_url=server.url, model="m", timeout_s=0.2, max_retries=1)
        with pytest.raises(EndpointError) as late:
            run_chat(cfg)
    assert late.value.reason == f"timeout: {server.url} did not answer in time"
    assert len(server.requests) == 2


def test_concurrency_is_bounded_per_endpoint() -> None:
    with ScriptedOpenAI(lambda body: Reply("x", delay_s=0.1)) as server:
        cfg = EndpointConfig(base_url=server.url, model="m", concurrency=3)

        async def go():
            client = build_client(cfg)
            results = await asyncio.gather(*(client.chat(HELLO) for _ in range(9)))
            await client.aclose()
            return results

        results = asyncio.run(go())
    assert [r.text for r in results] == ["x"] * 9
    assert server.peak_in_flight == 3


def test_names_on_one_server_share_its_smallest_bound_whatever_their_order() -> None:
    """synth's roles and eval's models on one base_url: the lowest concurrency holds for all
    of them together (synth used to keep the first role's, ignoring a lower one after it)."""
    with ScriptedOpenAI(lambda body: Reply("x", delay_s=0.1)) as server:
        seeker = EndpointConfig(base_url=server.url, model="m", concurrency=8)
        counselor = EndpointConfig(base_url=server.url, model="m", concurrency=2)

        async def go():
            clients = build_clients({"seeker": seeker, "counselor": counselor})
            chats = [c.chat(HELLO) for c in clients.values() for _ in range(4)]
            results = await asyncio.gather(*chats)
            await close_all(clients.values())
            return results

        results = asyncio.run(go())
    assert [r.text for r in results] == ["x"] * 8
    assert server.peak_in_flight == 2


def test_missing_key_env_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.delenv("SOULRAY_TEST_KEY", raising=False)
    cfg = EndpointConfig(base_url="http://x/v1", model="m", api_key_env="SOULRAY_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable SOULRAY_TEST_KEY is not set"):
        build_client(cfg)


def test_a_body_that_is_not_a_completion_is_an_endpoint_error() -> None:
    from soulray.endpoints import parse_completion

    ok = {"choices": [{"message": {"content": None}}], "usage": None}
    assert parse_completion(ok, "u") == ChatResult("", 0, 0)
    with pytest.raises(EndpointError, match="bad_response: u answered \"{'error': 'x'}\""):
        parse_completion({"error": "x"}, "u")
    with pytest.raises(EndpointError, match="bad_response: u answered .*123"):
        parse_completion({"choices": [{"message": {"content": 123}}]}, "u")  # not text
    # a good reply with a usage out of shape counts no tokens: it failed the whole run
    reply = {"choices": [{"message": {"content": "hi"}}]}
    for usage in ("none", {"prompt_tokens": "n/a", "completion_tokens": float("inf")}, [3]):
        assert parse_completion({**reply, "usage": usage}, "u") == ChatResult("hi", 0, 0)
    counted = {"prompt_tokens": 7.0, "completion_tokens": True}
    assert parse_completion({**reply, "usage": counted}, "u") == ChatResult("hi", 7, 0)


def test_a_200_whose_body_is_not_json_fails_that_request_only() -> None:
    """A broken proxy's 200: an EndpointError (one scenario or reply fails, with its reason),
    never a JSONDecodeError that ends the whole job; then the next request is answered."""
    answers = iter([Reply(raw=b"{not json"), Reply("fine")])
    with ScriptedOpenAI(lambda body: next(answers)) as server:
        cfg = EndpointConfig(base_url=server.url, model="m", max_retries=0)
        with pytest.raises(EndpointError) as err:
            run_chat(cfg)
        assert err.value.reason.startswith(
            f"bad_response: {server.url} answered a body that is not JSON"
        )
        assert run_chat(cfg)[0].text == "fine"
