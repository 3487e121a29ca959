"""Shared fixtures: the real corpora beside the project, and one local Ray per test module."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from soulray_testing import (
    QUICKSTART,
    RETRAIN_TEST,
    ROOT,
    SCREENED_MODULES,
    SOULRAY,
    retrain_in_background,
    screen_in_background,
    stop_retrain,
)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the whole test module."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # as soulray's init_ray: Serve's proxy may take more than its default 5 s to start on a busy
    # 2-CPU machine, and was then killed and serve.start failed (seen with a probe running beside)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    # address="local": always a fresh local Ray, never a cluster someone else started on this
    # machine (ray.init() alone joins the last `ray start` cluster or RAY_ADDRESS)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def ray_auth_mode_restored():
    """RAY_AUTH_MODE as it was before each test. `soulray submit` (and a verb run with
    RAY_ADDRESS) sets it when a token file exists; in this process, which imported ray with it
    unset, a later ray.init would start a GCS that asks for the token its driver never sends.
    (monkeypatch.delenv of an unset variable records nothing to restore.)"""
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


@pytest.fixture(scope="session")
def prepared_quickstart(tmp_path_factory) -> Path:
    """The quickstart corpus prepared once per session by the real CLI (on its own local Ray)."""
    out = tmp_path_factory.mktemp("prepared")
    cmd = [SOULRAY, "prepare", "--config", str(QUICKSTART), f"data.output_dir={out}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


def pytest_collection_finish(session):
    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the test starts its own retrain when a worker runs it
    if any(item.nodeid.endswith(RETRAIN_TEST) for item in session.items):
        retrain_in_background()
    if any(item.nodeid.split("::")[0].endswith(SCREENED_MODULES) for item in session.items):
        screen_in_background()


def pytest_sessionfinish(session):
    stop_retrain()


def pytest_collection_modifyitems(config, items):
    # the retrain comparison runs last: by then the background retrain has had the whole session
    items.sort(key=lambda item: item.nodeid.endswith(RETRAIN_TEST))
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
