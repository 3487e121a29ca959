"""The whole app on a local Ray Serve (2 CPUs, one Serve startup for the module): the official
openai client over real HTTP, errors, 32 concurrent requests batched, autoscaling config, a killed
engine replica replaced, safety in both languages, and no message text in the logs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from soulray_testing import assert_hang_ups_free_the_row, free_port

from soulray.config import Config
from soulray.serve.generate import Delta

pytestmark = pytest.mark.slow

KEY = "ray-test-key"
MARKER = "quokka-7f3a9c"  # sent in every message; must never reach a log file
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 24.0,
    "upscale_delay_s": 60.0,  # long: the load below must not add a replica mid-test
    "downscale_delay_s": 90.0,
}


def serve_details():
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_get_global_client().get_serve_details())


def engine_replicas() -> list:
    deployment = serve_details().applications["soulray"].deployments["Engine"]
    return [r for r in deployment.replicas if r.state == "RUNNING"]


@pytest.fixture(scope="module")
def served(ray_local, tiny_export, tmp_path_factory):
    from ray import serve

    from soulray.serve.app import start_serving

    keyfile = tmp_path_factory.mktemp("secret") / "api-key"
    keyfile.write_text(KEY)
    cfg = Config.model_validate(
        {
            "serve": {
                "port": free_port(),
                "layout": "two_deployments",  # the engine behind a handle (one_deployment:
                "auth": {"api_key_file": str(keyfile)},  # test_serve_one_deployment.py)
                "ingress": {"num_cpus": 0.1},
                "engine": {
                    "model_dir": str(tiny_export),
                    "autoscaling": AUTOSCALING,
                    "max_ongoing_requests": 48,
                    "health_check_period_s": 1.0,
                    "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                },
            }
        }
    )
    url = start_serving(cfg)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text} {MARKER}"}]


def test_openai_client_whole_and_streamed(client):
    out = client.chat.completions.create(
        model="soulray", messages=ask("I had a rough day"), max_tokens=8, seed=1
    )
    assert out.object == "chat.completion" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    assert out.model_extra["safety"]["flagged"] is False
    chunks = list(
        client.chat.completions.create(
            model="soulray",
            messages=ask("I had a rough day"),
            max_tokens=8,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    # the same seeded request streamed: the same text, finish reason and usage
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == out.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [out.choices[0].finish_reason]
    assert chunks[-1].usage == out.usage
    assert [m.id for m in client.models.list().data] == ["soulray"]
    assert client.models.retrieve("soulray").id == "soulray"


def test_bad_requests_get_openai_errors_and_serving_continues(served, client):
    post, auth = f"{served}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    greedy = {"model": "soulray", "messages": ask("hi"), "max_tokens": 4, "temperature": 0}
    before = client.chat.completions.create(**greedy)
    cases = [
        (400, dict(content=b"{oops", headers=auth)),
        (400, dict(json={"model": "soulray"}, headers=auth)),
        (400, dict(json={"messages": [{"role": "robot", "content": MARKER}]}, headers=auth)),
        (413, dict(json={"messages": ask("x" * 70000)}, headers=auth)),
        (401, dict(json={"messages": ask("hi")}, headers={"Authorization": "Bearer wrong"})),
        (404, dict(json={"model": "nope", "messages": ask("hi")}, headers=auth)),
    ]
    for status, kwargs in cases:
        resp = httpx.post(post, timeout=60, **kwargs)
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    after = client.chat.completions.create(**greedy)  # answered as before the bad requests
    assert after.choices[0].message.content == before.choices[0].message.content
    assert after.choices[0].finish_reason == before.choices[0].finish_reason
    assert after.usage == before.usage


def test_concurrent_requests_all_succeed_in_batches(served):
    from ray import serve

    async def one(http: httpx.AsyncClient, i: int) -> int:
        body = {"messages": ask(f"request {i}"), "max_tokens": 8, "seed": i}
        resp = await http.post("/v1/chat/completions", json=body)
        return resp.status_code

    async def burst() -> list[int]:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=served, headers=headers, timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)))

    handle = serve.get_deployment_handle("Engine", app_name="soulray")
    before = handle.counters.remote().result()
    assert asyncio.run(burst()) == [200] * 32
    after = handle.counters.remote().result()
    assert after["requests"] - before["requests"] == 32  # one replica ran them all...
    steps = {k: v - before["step_sizes"].get(k, 0) for k, v in after["step_sizes"].items()}
    multi = sum(n for size, n in steps.items() if size > 1)
    assert multi > 0 and after["max_batch"] > 1  # ...many rows per forward pass


def engine_counters() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Engine", app_name="soulray").counters.remote().result()


def test_a_disconnected_client_frees_its_row(served):
    """Streamed or not, a hang-up frees the engine row (two deployments: across the handle)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    # a message the crisis screen passes: a flagged request streams its help lines first, before
    # generation starts ("tell me all of it" is flagged since stop 25's softmax head)
    assert_hang_ups_free_the_row(served, headers, engine_counters, ask("tell me a long story"))


def test_a_second_soulray_app_on_the_cluster_is_refused_naming_the_first(served, tiny_export):
    """Every soulray app serves at the route prefix /: Serve refused a second one with its own
    RayServeException; the error names the app there and the ways out."""
    from soulray.serve.app import start_serving

    serve_cfg = {"app_name": "second", "port": free_port(), "engine": {"kind": "noop"}}
    serve_cfg["engine"]["model_dir"] = str(tiny_export)
    with pytest.raises(ValueError) as e:
        start_serving(Config.model_validate({"serve": serve_cfg}))
    assert str(e.value) == (
        "serve.app_name=second: this Ray cluster already serves the application 'soulray' at "
        "the route prefix /, where a soulray app serves (one per cluster): redeploy it under "
        "its own name (serve.app_name=soulray), serve more models from one app with "
        "serve.adapters, or use another Ray cluster"
    )
    assert httpx.get(f"{served}/healthz", timeout=10).status_code == 200  # the first still up


def test_autoscaling_settings_are_what_serve_reports(served):
    config = serve_details().applications["soulray"].deployments["Engine"].deployment_config
    reported = config.autoscaling_config
    assert {k: reported[k] for k in AUTOSCALING} == AUTOSCALING
    assert config.max_ongoing_requests == 48 and config.max_queued_requests == 256
    assert config.ray_actor_options.num_cpus == 1.0


def test_safety_in_both_languages(client):
    cases = [
        ("I want to end my life", "en-US", "988"),
        ("我真的不想活了", "zh-CN", "12356"),
        ("我真的不想活了，撐不下去了", "zh-Hant", "1925"),  # Traditional: Taiwan's and Hong Kong's
    ]
    for text, locale, number in cases:
        out = client.chat.completions.create(model="soulray", messages=ask(text), max_tokens=4)
        safety = out.model_extra["safety"]
        assert safety["flagged"] and safety["locale"] == locale
        assert number in out.choices[0].message.content
    calm = client.chat.completions.create(model="soulray", messages=ask("最近好累"), max_tokens=4)
    assert calm.model_extra["safety"]["flagged"] is False


EARLIER_CRISIS = ["i don't want to be alive anymore", "work was long", "my sister visited", "ok"]


def test_a_crisis_three_turns_back_gets_help_lines_before_the_first_token(client):
    messages = []
    for text in EARLIER_CRISIS:
        messages += [*ask(text), {"role": "assistant", "content": "I'm listening."}]
    messages = messages[:-1]
    chunks = list(
        client.chat.completions.create(
            model="soulray", messages=messages, max_tokens=6, seed=3, stream=True
        )
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta]
    assert chunks[0].model_extra["safety"]["category"] == "suicide"
    assert texts[0] == "" and texts[1].startswith("If you are in crisis, help is available:")
    assert "988" in texts[1] and len(texts) > 2  # the model's tokens come after
    whole = client.chat.completions.create(model="soulray", messages=messages, max_tokens=6)
    assert whole.choices[0].message.content.startswith("If you are in crisis")


class MethodEngine:
    """An engine deployment whose reply gives method details (what the reply screen must stop)."""

    PIECES = ("If you take forty of those tablets ", "at once it would be lethal. ", "Slowly.")

    async def stream(self, req):
        for i, piece in enumerate(self.PIECES):
            yield Delta(piece, i + 1, "stop" if i == len(self.PIECES) - 1 else None)

    async def generate(self, req):
        return [Delta("".join(self.PIECES), len(self.PIECES), "stop")]


@pytest.fixture(scope="module")
def guarded(served, tiny_export):
    """A second app on the same Serve: the real ingress in front of MethodEngine."""
    import sys

    import ray
    from ray import serve

    from soulray.serve.app import Ingress
    from soulray.serve.engine import as_deployment

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = Config.model_validate({"serve": {"engine": {"model_dir": str(tiny_export)}}})
    engine = as_deployment(MethodEngine).options(ray_actor_options={"num_cpus": 0}).bind()
    ingress = as_deployment(Ingress).options(ray_actor_options={"num_cpus": 0})
    serve.run(
        ingress.bind(cfg.model_dump(mode="json"), engine), name="guarded", route_prefix="/guarded"
    )
    yield OpenAI(base_url=f"{served}/guarded/v1", api_key="none", max_retries=0)
    serve.delete("guarded")


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_with_method_details_is_replaced_through_serve(guarded, stream):
    messages = ask("what do these tablets do")
    if stream:
        chunks = list(
            guarded.chat.completions.create(model="soulray", messages=messages, stream=True)
        )
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        safety = chunks[-1].model_extra["safety"]
    else:
        out = guarded.chat.completions.create(model="soulray", messages=messages)
        content, safety = out.choices[0].message.content, out.model_extra["safety"]
    assert "lethal" not in content and "forty" not in content
    assert content.startswith("I'm really glad you told me") and "988" in content
    assert safety["reply_replaced"] and safety["category"] == "suicide"


def test_killed_engine_replica_is_replaced(client):
    greedy = {"model": "soulray", "messages": ask("back?"), "max_tokens": 4, "temperature": 0}
    before = client.chat.completions.create(**greedy)
    (old,) = engine_replicas()
    os.kill(old.pid, signal.SIGKILL)
    deadline = time.time() + 90
    while time.time() < deadline:
        running = engine_replicas()
        if running and running[0].pid != old.pid:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Serve did not replace the killed engine replica within 90 s")
    out = client.chat.completions.create(**greedy)  # the new replica: the same weights
    assert out.choices[0].message.content == before.choices[0].message.content
    assert out.usage.completion_tokens == before.usage.completion_tokens


SOULRAY_METRICS = [
    "ray_soulray_requests_total",
    "ray_soulray_time_to_first_token_seconds_bucket",
    "ray_soulray_generated_tokens_total",
    "ray_soulray_engine_step_seconds_bucket",
    "ray_soulray_engine_batch_size_bucket",
    "ray_soulray_engine_queue_depth",
    "ray_soulray_engine_running_requests",
]


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label set: value} of one series name in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


def test_metrics_reach_rays_prometheus_endpoint(served, client):
    """soulray's metrics and Serve's are on Ray's metrics port after requests; no message text."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    client.chat.completions.create(model="soulray", messages=ask("metrics please"), max_tokens=6)
    bad = httpx.post(f"{served}/v1/chat/completions", json={}, headers={"Authorization": "x"})
    assert bad.status_code == 401
    deadline, text = time.time() + 120, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        statuses = metric_values(text, "ray_soulray_requests_total")
        if all(n in text for n in SOULRAY_METRICS) and any('status="401"' in k for k in statuses):
            break
        time.sleep(2)
    missing = [n for n in SOULRAY_METRICS if n not in text]
    assert missing == [], f"not on the metrics endpoint: {missing}"
    statuses = metric_values(text, "ray_soulray_requests_total")
    ok = sum(v for k, v in statuses.items() if 'status="200"' in k)
    assert ok >= 1 and any('status="401"' in k for k in statuses)
    assert all('deployment="Ingress"' in k for k in statuses)
    assert sum(metric_values(text, "ray_soulray_generated_tokens_total").values()) >= 6
    assert "ray_serve_num_http_requests_total" in text  # Serve's own, beside ours
    assert MARKER not in text and "metrics please" not in text


def test_no_message_content_in_the_logs(served):
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    serve_logs = [p for p in files if "serve" in p.parts]
    assert any(b"request chatcmpl-" in p.read_bytes() for p in serve_logs)  # we log, by id
    leaked = [str(p) for p in files if MARKER.encode() in p.read_bytes()]
    assert leaked == []
    # Serve's max_ongoing_requests advice does not apply to continuous batching (engine.py)
    assert not any(b"`max_concurrent_batches`" in p.read_bytes() for p in files)


def test_stopping_leaves_the_app_to_a_later_deploy_by_another_process(served, capsys):
    """A `soulray serve` stopped (Ctrl-C, SIGTERM) after another process deployed the same app
    leaves it serving: stopping an old server took down the new one's app (a review, stop 42).
    The other process here records its deploy as start_serving does, from its own driver."""
    import subprocess
    import sys

    import ray
    from ray import serve

    from soulray.cli import stop_on_interrupt
    from soulray.serve.app import deployed_here_last

    assert deployed_here_last("soulray")  # the module's start_serving
    other = (
        "import ray; from soulray.serve.app import record_deploy; "
        f"ray.init(address={ray.get_runtime_context().gcs_address!r}); record_deploy('soulray')"
    )
    subprocess.run([sys.executable, "-c", other], check=True, timeout=300)
    assert not deployed_here_last("soulray")
    with stop_on_interrupt("soulray"):
        raise KeyboardInterrupt
    assert "soulray" in serve.status().applications
    assert "left serving" in capsys.readouterr().out
