"""`soulray submit`: run a soulray verb as a Ray job on a cluster, follow its logs, return its fate.

    soulray submit --address http://HEAD:8265 -- soulray train --config jobs/X.yaml

By default the project directory is uploaded as the job's working_dir (so the cluster runs this
checkout of soulray with the Python packages its image already has); with --no-upload the cluster
image must already hold soulray. Token authentication is handled by Ray's JobSubmissionClient: it
sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when the cluster
requires one. `ray job submit --address ... --working-dir . -- python -m soulray.cli ...` is the
plain-Ray equivalent.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

EXCLUDES = [
    ".git",
    ".venv",
    "runs",
    "cluster/.local",
    "bench/results",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "**/__pycache__",
    "*.egg-info",
    ".devwhl",
    ".whl",
]
# every verb of soulray.cli but submit itself and chat (interactive: a job has no terminal)
VERBS = ("prepare", "train", "serve", "pipeline", "quickstart", "synth", "eval", "report")


def build_entrypoint(command: list[str], upload: bool) -> str:
    """`soulray VERB ARGS` -> the shell command the job runs."""
    if command[:1] == ["soulray"]:
        command = command[1:]
    if command[:1] == ["chat"]:
        raise ValueError(
            "`soulray chat` is interactive and a Ray job has no terminal; run it on your own "
            "machine against the served endpoint: soulray chat --url http://HEAD:8000"
        )
    if not command or command[0] not in VERBS:
        raise ValueError(
            f"expected a soulray command after --, e.g. `-- soulray train --config jobs/X.yaml`; "
            f"got {shlex.join(command) or 'nothing'} (verbs: {', '.join(VERBS)})"
        )
    # With an uploaded working_dir, run the uploaded package, not one installed on the cluster.
    launcher = ["python", "-m", "soulray.cli"] if upload else ["soulray"]
    return shlex.join([*launcher, *command])


def build_runtime_env(project: Path, upload: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(project), "excludes": EXCLUDES} if upload else {}
    if os.environ.get("SOULRAY_DEBUG"):  # full tracebacks in the job's logs too
        env["env_vars"] = {"SOULRAY_DEBUG": os.environ["SOULRAY_DEBUG"]}
    return env


def submit_job(
    address: str | None, command: list[str], wait: bool, upload: bool, project: Path
) -> tuple[str, str]:
    """Submit; with wait, stream the logs until the job ends. Returns (job id, final status)."""
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except ConnectionError as e:
        where = address or os.environ.get("RAY_ADDRESS") or "the default address"
        reason = str(e).rstrip(".")
        raise ValueError(
            f"cannot reach a Ray cluster's job API at {where} ({reason}); start one "
            "(`ray start --head`, or cluster/local.sh up) or pass --address http://HEAD:8265, "
            "the dashboard port"
        ) from None
    verb = command[1] if command[:1] == ["soulray"] and len(command) > 1 else command[0]
    job_id = client.submit_job(
        entrypoint=build_entrypoint(command, upload),
        runtime_env=build_runtime_env(project, upload),
        submission_id=f"soulray-{verb}-{time.strftime('%Y%m%d-%H%M%S')}",
        metadata={"soulray_command": shlex.join(command)},
    )
    if wait:
        asyncio.run(follow_logs(client, job_id))
    return job_id, client.get_job_status(job_id).value


async def follow_logs(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
