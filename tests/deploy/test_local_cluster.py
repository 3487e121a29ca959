"""cluster/local.sh brings up a real multi-node Ray (head + worker raylets on one machine) with
token auth, and `down` leaves none of its processes behind.

The cluster runs in a state directory of the test's own, so a developer's cluster started with
cluster/local.sh (state in cluster/.local) is never touched; nothing here runs `ray stop`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from k8s_render import ROOT

LOCAL_SH = ROOT / "cluster" / "local.sh"
PROBE = """
import json, os, ray
ray.init(address=os.environ["RAY_GCS_ADDRESS"], logging_level="error")
nodes = [n for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=0, resources={"soulray_worker_1": 0.01})
def where():
    return ray.get_runtime_context().get_node_id()
print(json.dumps({"nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes],
                  "task_node": ray.get(where.remote())}))
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="local.sh reads /proc (Linux)"),
]


def run(*args: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value
    return out


def cluster_processes(cluster_id: str) -> list[int]:
    """Processes carrying the cluster's environment marker (every process local.sh started)."""
    marker = f"SOULRAY_LOCAL_CLUSTER={cluster_id}".encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited process its parent has not reaped yet runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def local_cluster(tmp_path):
    """`local.sh up 1` in a private state dir; always torn down with `local.sh down`."""
    env = {**os.environ, "SOULRAY_LOCAL_DIR": str(tmp_path / "state"), "PYTHON": sys.executable}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    up = run(str(LOCAL_SH), "up", "1", env=env)
    state = tmp_path / "state"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, state, up.stdout
    finally:
        if (state / "state").exists():
            run(str(LOCAL_SH), "down", env=env)


def test_up_starts_two_nodes_with_token_auth_and_down_leaves_nothing(local_cluster):
    env, state, banner = local_cluster
    settings = dict(line.split("=", 1) for line in (state / "state").read_text().splitlines())
    cluster_id, pids = settings["CLUSTER_ID"], settings["PIDS"].strip("'").split()
    assert "2 nodes alive" in banner and settings["DASHBOARD_URL"] in banner
    assert len(pids) == 2 and cluster_processes(cluster_id)
    client = {**env, **read_env_file(state / "env")}

    # Two alive nodes: the head and worker 1, each with its own resources; a task asking for
    # worker 1's custom resource runs on the worker, not on the head.
    probe = run(sys.executable, "-c", PROBE, env=client, timeout=120)
    assert probe.returncode == 0, probe.stderr
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    by_role = {("head" if "soulray_head" in n["resources"] else "worker"): n for n in info["nodes"]}
    assert set(by_role) == {"head", "worker"} and len(info["nodes"]) == 2
    assert by_role["worker"]["resources"]["CPU"] == 2
    assert by_role["worker"]["resources"]["soulray_worker_1"] == 1
    assert info["task_node"] == by_role["worker"]["id"]

    # The job API needs the token: refused without it, a job runs with it.
    url = settings["DASHBOARD_URL"] + "/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    ray_cli = str(Path(sys.executable).parent / "ray")
    job = run(
        ray_cli, "job", "submit", "--", "python", "-c", "print('soulray-local-ok')", env=client
    )
    assert job.returncode == 0 and "soulray-local-ok" in job.stdout, job.stdout + job.stderr

    # A second `up` refuses instead of starting another cluster over the recorded one.
    again = run(str(LOCAL_SH), "up", "1", env=env)
    assert again.returncode != 0 and "already recorded" in again.stderr

    down = run(str(LOCAL_SH), "down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "no process left" in down.stdout
    assert cluster_processes(cluster_id) == []
    for pid in pids:
        assert not running(int(pid)), f"ray start --block {pid} is still running"
    assert not (state / "state").exists() and not (state / "auth_token").exists()
    assert not Path(settings["TEMP_DIR"]).exists()
