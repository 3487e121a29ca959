"""serve.wait_for_model_s on a local Ray Serve: the app is deployed before its export exists (a
RayService applied together with the RayJob that trains it); the ingress and engine replicas
wait, Serve neither kills nor restarts them, and the app answers once the export is written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from soulray_testing import free_port

from soulray.config import Config
from soulray.train.checkpoint import upload_dir

pytestmark = pytest.mark.slow


def waiting_replicas(logs: Path) -> list[str]:
    """The deployments whose replica logged that it waits for the export."""
    files = [p for p in logs.rglob("replica_soulray_*.log")]
    return sorted(
        p.name.split("_")[2] for p in files if b"waiting for the export" in p.read_bytes()
    )


def test_replicas_wait_for_the_export_and_then_serve(ray_local, tiny_export, tmp_path):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from soulray.serve.app import start_serving

    export = tmp_path / "model"
    cfg = Config.model_validate(
        {
            "serve": {
                "port": free_port(),
                "layout": "two_deployments",  # both deployments wait
                "wait_for_model_s": 120,
                "ingress": {"num_cpus": 0.1},
                "engine": {"model_dir": str(export), "num_cpus": 1},
            }
        }
    )
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    waited: list[str] = []

    def train() -> None:  # the RayJob: exports once both replicas wait for it
        deadline = time.monotonic() + 120
        while waiting_replicas(logs) != ["Engine", "Ingress"] and time.monotonic() < deadline:
            time.sleep(0.5)
        waited.extend(waiting_replicas(logs))
        time.sleep(2)  # past Serve's checks of a starting replica
        upload_dir(str(tiny_export), str(export))

    writer = threading.Thread(target=train)
    writer.start()
    try:
        url = start_serving(cfg)  # serve.run returns when the app is RUNNING
        writer.join()
        assert waited == ["Engine", "Ingress"]
        details = ServeInstanceDetails(**_get_global_client().get_serve_details())
        app = details.applications["soulray"]
        assert app.status == "RUNNING"
        for deployment in app.deployments.values():  # one replica each, started once
            assert [r.state for r in deployment.replicas] == ["RUNNING"]
            assert "failed to start" not in deployment.message
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "seed": 1}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        assert reply["usage"]["completion_tokens"] == 4
    finally:
        writer.join()
        serve.shutdown()
