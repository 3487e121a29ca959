"""`soulray submit`: run a soulray verb as a Ray job on a cluster, follow its logs, return its fate.

    soulray submit --address http://HEAD:8265 -- soulray train --config jobs/X.yaml

By default the project directory is uploaded as the job's working_dir (so the cluster runs this
checkout of soulray with the Python packages its image already has); with --no-upload the cluster
image must already hold soulray. Token authentication is handled by Ray's JobSubmissionClient: it
sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when the cluster
requires one and RAY_AUTH_MODE=token, which this command sets when one of those exists (a plain
`ray job submit` needs `export RAY_AUTH_MODE=token`).
`ray job submit --address ... --working-dir . -- python -m soulray.cli ...` is the plain-Ray
equivalent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("soulray.submit")

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
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in the order Ray's client reads them
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


def build_runtime_env(project: Path, upload: bool, forward: tuple[str, ...] = ()) -> dict[str, Any]:
    """The job's runtime_env: the upload, and the environment variables `forward` names (an
    endpoint's key for synth or eval, say: the job's driver reads it on the cluster, where this
    shell's exports are not) taken from this shell, with SOULRAY_DEBUG when it is set."""
    env: dict[str, Any] = {"working_dir": str(project), "excludes": EXCLUDES} if upload else {}
    for name in forward:
        if "=" in name:
            raise ValueError(
                f"--env takes a variable's name, not {name.split('=', 1)[0]}=VALUE: export it "
                f"in this shell and pass --env {name.split('=', 1)[0]}"
            )
        if name not in os.environ:
            raise ValueError(f"--env {name}: the variable is not set in this shell; export it")
    names = [*forward, *(["SOULRAY_DEBUG"] if os.environ.get("SOULRAY_DEBUG") else [])]
    if names:  # SOULRAY_DEBUG: full tracebacks in the job's logs too
        env["env_vars"] = {name: os.environ[name] for name in names}
    return env


def send_token_if_present() -> None:
    """Ray 2.60's client sends the cluster token only with RAY_AUTH_MODE=token (read once, when
    ray is imported): a token on this machine means the cluster wants it, so send it."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def check_project(project: Path) -> None:
    """An upload sends the current directory: it must be the soulray checkout's root."""
    if not (
        (project / "soulray" / "__init__.py").is_file() and (project / "pyproject.toml").is_file()
    ):
        raise ValueError(
            f"{project} is not the soulray project's root (no soulray/ and pyproject.toml here), "
            "and soulray submit uploads the current directory as the job's working_dir; cd to "
            "the checkout's root (the job's --config and data paths are relative to it), or pass "
            "--no-upload to run the soulray installed on the cluster"
        )


# what each verb writes: a relative path there lands in Ray's temporary copy of the project
OUTPUTS = {
    "prepare": ("data.output_dir",),
    "train": ("train.storage_path", "train.export_dir"),
    "synth": ("synth.output_dir",),
    "eval": ("eval.output_dir",),
    "pipeline": ("data.output_dir", "train.storage_path", "train.export_dir", "pipeline.run_dir"),
}
OUTPUTS["quickstart"] = OUTPUTS["pipeline"]


def relative_outputs(command: list[str]) -> list[str]:
    """The output paths of the command's config that are relative: with an upload the job runs
    in Ray's temporary copy of the project, so what it writes there is lost after the job."""
    from soulray.config import load_config

    args = command[1:] if command[:1] == ["soulray"] else command
    keys = OUTPUTS.get(args[0], ()) if args else ()
    if not keys:
        return []
    config, overrides, rest = None, [], iter(args[1:])
    for arg in rest:
        if arg in ("--config", "-c"):
            config = next(rest, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):  # not an option's value (--fail-if-worse b)
            overrides.append(arg)
    from soulray.pipeline import with_run_dir

    try:
        cfg = load_config(config, overrides)
        cfg = with_run_dir(cfg) if args[0] in ("pipeline", "quickstart") else cfg
    except Exception:  # the job reports a bad config itself, with the cluster's files
        return []
    out = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and not os.path.isabs(value):
            out.append(f"{key}={value}")
    return out


def submit_job(
    address: str | None,
    command: list[str],
    wait: bool,
    upload: bool,
    project: Path,
    forward: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Submit; with wait, stream the logs until the job ends. Returns (job id, final status)."""
    entrypoint = build_entrypoint(command, upload)
    runtime_env = build_runtime_env(project, upload, forward)
    if upload:
        check_project(project)
        for output in relative_outputs(command):
            log.warning(
                "warning: %s is relative: the job runs in Ray's temporary copy of this project "
                "on the cluster, so what it writes there is gone after the job (and a later job "
                "will not find it); override it with an absolute path on storage the cluster "
                "keeps, e.g. %s=/mnt/shared/soulray/...",
                output,
                output.split("=", 1)[0],
            )
    send_token_if_present()
    from ray.exceptions import AuthenticationError, RpcError
    from ray.job_submission import JobSubmissionClient

    env = [os.environ[v] for v in ADDRESS_VARS if os.environ.get(v)]
    where = address or (env[0] if env else "the default address")
    try:
        with flag_address_wins(address):
            client = JobSubmissionClient(address)
        verb = command[1] if command[:1] == ["soulray"] and len(command) > 1 else command[0]
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            # a random tail: two submissions in one second get two ids
            submission_id=f"soulray-{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
            metadata={"soulray_command": shlex.join(command)},
        )
    except ConnectionError as e:
        reason = str(e).rstrip(".")
        raise ValueError(
            f"cannot reach a Ray cluster's job API at {where} ({reason}); start one "
            "(`ray start --head`, or cluster/local.sh up) or pass --address http://HEAD:8265, "
            "the dashboard port"
        ) from None
    except RpcError as e:  # an address without a scheme is looked up as a GCS address
        raise ValueError(
            f"no Ray cluster answers at {where} ({e.message.rstrip('.')}): an address without "
            "http:// is taken as a cluster's GCS address (HEAD:6379); for the job API pass "
            "--address http://HEAD:8265, the dashboard port"
        ) from None
    except AuthenticationError as e:
        raise ValueError(
            f"the Ray cluster at {where} refused the job: {e.message}; it uses token "
            "authentication: put its token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) and "
            "export RAY_AUTH_MODE=token"
        ) from None
    except RuntimeError as e:  # the job API's own errors (e.g. its agent not up yet)
        raise ValueError(
            f"the Ray cluster at {where} did not take the job: {str(e).strip()}; "
            "check `ray status` and submit again"
        ) from None
    if wait:
        # Our own handler: with Python's default one, asyncio.run turns Ctrl-C into a
        # cancellation of the log tail, which the tail can absorb (it then followed on to the
        # job's end); an exception raised where the loop is cannot be absorbed
        previous = signal.signal(signal.SIGINT, _interrupt)
        try:
            print(
                f"submitted {job_id}; following its logs (Ctrl-C stops following, not the job)",
                file=sys.stderr,
                flush=True,
            )
            asyncio.run(follow_logs(client, job_id))
        except KeyboardInterrupt:
            print(
                f"\nstopped following {job_id}; the job keeps running on the cluster. Follow "
                f"it again: {job_commands(job_id, address)}",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGINT, previous)
    return job_id, client.get_job_status(job_id).value


def job_commands(job_id: str, address: str | None) -> str:
    """Ray's own commands to follow and stop the job. A flag or variable names the cluster,
    else the default; on a token cluster `ray job` sends the token only with
    RAY_AUTH_MODE=token, which send_token_if_present set in this process alone."""
    env = [os.environ[v] for v in ADDRESS_VARS if os.environ.get(v)]
    flag = f" --address {address or env[0]}" if address or env else ""
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    return f"{auth}ray job logs --follow {job_id}{flag}; stop it: {auth}ray job stop {job_id}{flag}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def flag_address_wins(address: str | None) -> Iterator[None]:
    """Ray's client lets $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, override its argument (as
    ray.init does); an --address typed on the command line wins here, as flags do."""
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARS if address and v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


async def follow_logs(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
