"""serve.layout=one_deployment on a local Ray Serve: the hf engine inside the ingress replica.
A client that hangs up (streamed or not) still frees its engine row at the next step, as it does
across the handle with two deployments (test_serve_ray.py)."""

from __future__ import annotations

import httpx
import pytest
from soulray_testing import assert_hang_ups_free_the_row, free_port

from soulray.config import Config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_local, tiny_export):
    from ray import serve

    from soulray.serve.app import start_serving

    cfg = Config.model_validate(
        {
            "serve": {
                "port": free_port(),
                "layout": "one_deployment",
                "engine": {"model_dir": str(tiny_export), "num_cpus": 1},
            }
        }
    )
    url = start_serving(cfg)
    yield url
    serve.shutdown()


def ingress_counters() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name="soulray").counters.remote().result()


def test_one_deployment_has_no_engine_deployment_and_answers(served):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    assert set(details.applications["soulray"].deployments) == {"Ingress"}
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "seed": 1}
    out = httpx.post(f"{served}/v1/chat/completions", json=body, timeout=120).json()
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"
    assert ingress_counters()["requests"] == 1


def test_a_disconnected_client_frees_its_row(served):
    # the message test_serve_ray.py sends: this tiny model's seeded reply runs past 1000 tokens,
    # and the crisis screen passes it
    messages = [{"role": "user", "content": "tell me a long story quokka-7f3a9c"}]
    assert_hang_ups_free_the_row(served, {}, ingress_counters, messages)
