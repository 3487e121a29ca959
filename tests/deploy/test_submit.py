"""`soulray submit` end to end on a real multi-node Ray (cluster/local.sh: a head + 1 worker
raylet, token auth): a tiny prepare + train job succeeds and exports a model; a job with a
config typo fails with the config error in its logs; `down` leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_render import ROOT
from soulray_testing import free_port
from test_local_cluster import cluster_processes, local_cluster, read_env_file, run, running

from soulray.submit import ADDRESS_VARS, build_entrypoint
from soulray.train.launch import storage_problem

__all__ = ["local_cluster"]  # the fixture, imported for use here
SOULRAY = str(ROOT / ".venv" / "bin" / "soulray") if (ROOT / ".venv").exists() else "soulray"


def initial_state(data_dir: str) -> dict:
    """The quickstart model's weights before training (the seeded init), for the data's
    tokenizer."""
    from soulray.config import load_config
    from soulray.train.data import load_run_tokenizer
    from soulray.train.model import build_model_config, load_initial_state

    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", [f"data.output_dir={data_dir}"])
    tokenizer = load_run_tokenizer(data_dir)
    return load_initial_state(cfg, build_model_config(cfg.model, tokenizer), "sdpa")


def test_entrypoint_runs_the_uploaded_package_and_rejects_non_soulray_commands() -> None:
    cmd = ["soulray", "train", "--config", "jobs/x.yaml", "train.steps=3"]
    assert build_entrypoint(cmd, upload=True) == (
        "python -m soulray.cli train --config jobs/x.yaml train.steps=3"
    )
    assert build_entrypoint(cmd, upload=False).startswith("soulray train ")
    with pytest.raises(ValueError, match="expected a soulray command"):
        build_entrypoint(["python", "evil.py"], upload=True)


def test_every_verb_but_submit_and_chat_can_be_submitted() -> None:
    """The README: every verb runs on any Ray cluster, and `soulray submit` is how; chat reads
    a terminal, which a job does not have, so it is refused with where to run it instead."""
    from soulray.cli import app
    from soulray.submit import VERBS

    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(VERBS) == verbs - {"submit", "chat"}
    with pytest.raises(ValueError, match="interactive.*soulray chat --url http://HEAD:8000"):
        build_entrypoint(["soulray", "chat", "--url", "http://x:8000"], upload=True)
    for verb in ("synth", "eval"):
        command = ["soulray", verb, "--config", f"jobs/{verb}.yaml"]
        expected = f"python -m soulray.cli {verb} --config jobs/{verb}.yaml"
        assert build_entrypoint(command, upload=True) == expected


def test_submit_to_an_address_with_no_cluster_says_how_to_start_one() -> None:
    from typer.testing import CliRunner

    from soulray.cli import app

    address = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["submit", "--address", address, "--", "soulray", "train"])
    assert result.exit_code == 1
    assert f"error: cannot reach a Ray cluster's job API at {address}" in result.output


def test_a_verb_run_against_a_ray_address_with_no_cluster_says_so_at_once() -> None:
    """RAY_ADDRESS=HOST:PORT where nothing listens: ray.init retried for ever (a warning every
    30 s); the verb now stops before Ray starts, naming the fix."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [SOULRAY, "prepare", "--config", "jobs/quickstart.yaml", "data.output_dir=/nonexistent"],
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: no Ray cluster answers at RAY_ADDRESS={address} (Connection refused): start "
        "one there (`ray start --head`; its GCS port is 6379 by default), correct the address, "
        "or unset RAY_ADDRESS to run on a local Ray"
    )


def test_an_address_without_http_says_to_give_the_dashboard_url(monkeypatch) -> None:
    """`--address HEAD:8265` (no http://) is looked up by Ray as a GCS address: after ~40 s
    its client raises RpcError, which was a raw traceback; it names the fix now."""
    import ray.job_submission
    from ray.exceptions import RpcError
    from typer.testing import CliRunner

    from soulray.cli import app

    def no_gcs(address):  # what Ray's client raises when no GCS answers at `address`
        raise RpcError("Timed out while waiting for GCS to become available.")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", no_gcs)
    result = CliRunner().invoke(app, ["submit", "--address", "h:8265", "--", "soulray", "train"])
    assert result.exit_code == 1
    assert result.output == (
        "error: no Ray cluster answers at h:8265 (Timed out while waiting for GCS to become "
        "available): an address without http:// is taken as a cluster's GCS address "
        "(HEAD:6379); for the job API pass --address http://HEAD:8265, the dashboard port\n"
    )


def test_the_address_flag_wins_over_the_environment(monkeypatch) -> None:
    """Ray's client would take $RAY_API_SERVER_ADDRESS over its argument (README's
    `source cluster/.local/env` exports it): the flag typed wins, and the error names it."""
    from typer.testing import CliRunner

    from soulray.cli import app

    typed, exported, ray_address = (f"http://127.0.0.1:{free_port()}" for _ in range(3))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", exported)
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    result = CliRunner().invoke(app, ["submit", "--address", typed, "--", "soulray", "train"])
    assert result.exit_code == 1
    reason = f"(Failed to connect to Ray at address: {typed})"
    assert f"cannot reach a Ray cluster's job API at {typed} {reason}" in result.output
    assert exported not in result.output and ray_address not in result.output
    assert os.environ["RAY_API_SERVER_ADDRESS"] == exported  # restored
    # without the flag: RAY_API_SERVER_ADDRESS first, as Ray's client reads them
    result = CliRunner().invoke(app, ["submit", "--", "soulray", "train"])
    assert (
        f"job API at {exported} (Failed to connect to Ray at address: {exported})" in result.output
    )
    assert "`ray start --head`, or cluster/local.sh up" in result.output


def test_local_checkpoints_are_refused_only_across_hosts(tmp_path) -> None:
    assert storage_problem(str(tmp_path), hosts=1) is None  # local.sh: many nodes, one host
    assert storage_problem("s3://bucket/ckpt", hosts=4) is None
    problem = storage_problem(str(tmp_path), hosts=2)
    assert problem and "spans 2 hosts" in problem and "s3://" in problem
    export = storage_problem(str(tmp_path), hosts=2, key="train.export_dir")
    assert export and export.startswith(f"train.export_dir={tmp_path} is a local directory")
    assert "rank 0 writes the export on whichever node" in export


def test_prepare_refuses_a_local_output_dir_across_hosts(tmp_path, monkeypatch) -> None:
    """Render actors write their shards on their own hosts: a local data.output_dir on a
    multi-host cluster is refused before any work (it was found out by train, after it)."""
    import soulray.train.launch
    from soulray.config import load_config
    from soulray.data.pipeline import run_prepare

    out = tmp_path / "data"
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", [f"data.output_dir={out}"])
    monkeypatch.setattr(soulray.train.launch, "cluster_hosts", lambda: 2)
    with pytest.raises(ValueError) as refused:
        run_prepare(cfg)
    assert str(refused.value) == (
        f"data.output_dir={out} is a local directory, but the Ray cluster spans 2 hosts: each "
        "render actor would write its shards to its own host's disk, and the manifest and "
        "training would not see them. Use shared storage: an s3:// or gs:// URI, or a path on "
        "an NFS mount present on every node"
    )
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="local.sh reads /proc (Linux)")
def test_submit_prepare_and_train_then_a_bad_config(local_cluster, tmp_path) -> None:
    env, state, _ = local_cluster
    client = {**env, **read_env_file(state / "env")}
    address = client["RAY_API_SERVER_ADDRESS"]
    out = tmp_path / "run"
    common = ["--config", "jobs/quickstart.yaml", f"data.output_dir={out}/data"]
    train = [
        *common,
        f"train.storage_path={out}/checkpoints",
        f"train.export_dir={out}/model",
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.log_every=2",
    ]

    prepare = run(
        SOULRAY,
        "submit",
        "--address",
        address,
        "--",
        "soulray",
        "prepare",
        *common,
        env=client,
        timeout=600,
    )
    assert prepare.returncode == 0, prepare.stdout[-3000:] + prepare.stderr[-3000:]
    assert "SUCCEEDED" in prepare.stdout and "prepared 60 conversations" in prepare.stdout

    trained = run(
        SOULRAY,
        "submit",
        "--address",
        address,
        "--",
        "soulray",
        "train",
        *train,
        env=client,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "SUCCEEDED" in trained.stdout and "trained quickstart to step 4" in trained.stdout
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()
    # the export is the trained model: at the configured step, every parameter moved
    assert json.loads((out / "model" / "metrics.json").read_text())["step"] == 4
    initial = initial_state(f"{out}/data")
    trained = model.state_dict()
    assert set(trained) == set(initial)
    assert [k for k in initial if torch.equal(trained[k], initial[k])] == []

    # Ctrl-C while following a job's logs: it said nothing of the job, which runs on
    again = ["--config", "jobs/quickstart.yaml", f"data.output_dir={out}/again"]
    follower = subprocess.Popen(
        [SOULRAY, "submit", "--address", address, "--", "soulray", "prepare", *again],
        cwd=ROOT,
        env=client,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = follower.stderr.readline()
    while first and not first.startswith("submitted "):  # Ray's warnings come first
        first = follower.stderr.readline()
    assert first.startswith("submitted soulray-prepare-"), first
    job_id = first.split()[1].rstrip(";")
    follower.send_signal(signal.SIGINT)
    follower.wait(timeout=60)
    said = follower.stderr.read()  # (communicate() lost what followed the readline above)
    assert follower.returncode == 130, said
    assert f"stopped following {job_id}; the job keeps running on the cluster" in said
    assert f"ray job stop {job_id} --address {address}" in said
    status = run(
        str(Path(sys.executable).parent / "ray"),
        "job",
        "status",
        job_id,
        "--address",
        address,
        env=client,
        timeout=60,
    )
    assert status.returncode == 0 and "STOPPED" not in status.stdout, status.stdout

    bad = run(
        SOULRAY,
        "submit",
        "--address",
        address,
        "--",
        "soulray",
        "train",
        *train,
        "train.stepz=3",
        env=client,
        timeout=600,
    )
    assert bad.returncode == 1
    assert "unknown config key 'train.stepz'" in bad.stdout and "FAILED" in bad.stdout

    cluster_id = read_env_file_plain(state / "state")["CLUSTER_ID"]
    down = run(str(ROOT / "cluster" / "local.sh"), "down", env=env)
    assert down.returncode == 0, down.stderr
    assert [p for p in cluster_processes(cluster_id) if running(p)] == []  # jobs' too


def read_env_file_plain(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_an_upload_from_outside_the_project_root_is_refused(tmp_path, monkeypatch) -> None:
    """The upload is the current directory: from jobs/ it would send jobs/ alone and run
    whatever soulray the cluster has installed."""
    from typer.testing import CliRunner

    from soulray.cli import app

    monkeypatch.chdir(ROOT / "jobs")
    result = CliRunner().invoke(
        app, ["submit", "--", "soulray", "prepare", "--config", "quickstart.yaml"]
    )
    assert result.exit_code == 1
    assert f"error: {ROOT / 'jobs'} is not the soulray project's root" in result.output
    assert "or pass --no-upload" in result.output


def test_relative_outputs_of_an_uploaded_job_are_named() -> None:
    from soulray.submit import relative_outputs

    config = str(ROOT / "jobs" / "quickstart.yaml")
    # each verb's own outputs (prepare writes no checkpoint); synth and eval too
    assert relative_outputs(["soulray", "prepare", "--config", config]) == [
        "data.output_dir=runs/quickstart/data"
    ]
    assert relative_outputs(["soulray", "train", "--config", config]) == [
        "train.storage_path=runs/quickstart/checkpoints",
        "train.export_dir=runs/quickstart/model",
    ]
    synth = str(ROOT / "jobs" / "synth.yaml")
    assert relative_outputs(["soulray", "synth", "-c", synth]) == ["synth.output_dir=runs/synth"]
    gate = ["soulray", "eval", "-c", config, "--fail-if-worse", "base", "eval.output_dir=out/e"]
    assert relative_outputs(gate) == ["eval.output_dir=out/e"]  # "base" is no override
    absolute = ["data.output_dir=/d", "train.storage_path=s3://b/c", "train.export_dir=/m"]
    assert relative_outputs(["soulray", "train", "-c", config, *absolute]) == []
    assert relative_outputs(["soulray", "report", "runs/x"]) == []  # no config to read
    # pipeline.run_dir places every output: only it counts
    run_dir = ["soulray", "pipeline", "-c", config, "pipeline.run_dir=s3://b/run"]
    assert relative_outputs(run_dir) == []
    assert relative_outputs([*run_dir[:-1], "pipeline.run_dir=runs/r"]) == [
        "data.output_dir=runs/r/data",
        "train.storage_path=runs/r/checkpoints",
        "train.export_dir=runs/r/model",
        "pipeline.run_dir=runs/r",
    ]


def test_a_token_on_this_machine_is_sent(tmp_path, monkeypatch) -> None:
    """Ray's client sends the token only with RAY_AUTH_MODE=token, which `ray start` does not
    tell the user to set: a token file or variable turns it on."""
    from soulray.submit import send_token_if_present

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")  # recorded first, so the variable is restored after
        monkeypatch.delenv(name)
    send_token_if_present()
    assert "RAY_AUTH_MODE" not in os.environ  # no token anywhere: nothing to send
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    send_token_if_present()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's own choice stands
    send_token_if_present()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


class FakeJobClient:
    """Ray's JobSubmissionClient as far as submit_job uses it: the log tail is cut by Ctrl-C."""

    def __init__(self, address):
        self.address = address

    def submit_job(self, **kwargs):
        return "soulray-train-1"

    async def tail_job_logs(self, job_id):
        yield "step 1\n"
        raise KeyboardInterrupt

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus.PENDING


def test_the_ray_job_commands_printed_send_the_token(tmp_path, monkeypatch) -> None:
    """Ctrl-C printed `ray job logs --follow ...`, which a token cluster refused: submit had
    set RAY_AUTH_MODE=token for itself alone, and `ray job` sends the token only with it."""
    import ray.job_submission
    from typer.testing import CliRunner

    from soulray.cli import app

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", *ADDRESS_VARS):
        monkeypatch.setenv(name, "")  # recorded first, so the variable is restored after
        monkeypatch.delenv(name)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    monkeypatch.chdir(ROOT)
    args = ["submit", "--address", "http://h:8265", "--", "soulray", "train"]
    result = CliRunner().invoke(app, [*args, "-c", "/no/such.yaml"])
    assert result.exit_code == 130
    assert result.output.splitlines()[-1] == (
        "stopped following soulray-train-1; the job keeps running on the cluster. Follow it "
        "again: RAY_AUTH_MODE=token ray job logs --follow soulray-train-1 --address "
        "http://h:8265; stop it: RAY_AUTH_MODE=token ray job stop soulray-train-1 --address "
        "http://h:8265"
    )


def test_a_job_submitted_without_waiting_says_how_to_follow_it(tmp_path, monkeypatch) -> None:
    """--no-wait printed the job's id and PENDING alone, as if nothing more could be seen."""
    import ray.job_submission
    from typer.testing import CliRunner

    from soulray.cli import app

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", *ADDRESS_VARS):
        monkeypatch.setenv(name, "")  # recorded first, so the variable is restored after
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://h:8265")
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    monkeypatch.chdir(ROOT)
    args = ["submit", "--no-wait", "--", "soulray", "train", "-c", "/no/such.yaml"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0
    assert result.output.splitlines()[-2:] == [
        "job soulray-train-1: PENDING",
        "  follow it: ray job logs --follow soulray-train-1 --address http://h:8265; stop it: "
        "ray job stop soulray-train-1 --address http://h:8265",
    ]


def test_submit_passes_only_the_variables_named_and_refuses_one_unset(monkeypatch, tmp_path):
    """--env NAME sends this shell's value to the job (an endpoint key the job's driver reads
    on the cluster); a name not set here is refused by name, before anything is submitted."""
    from soulray.submit import build_runtime_env

    monkeypatch.setenv("JUDGE_API_KEY", "sk-test")
    monkeypatch.setenv("OTHER_SECRET", "never-sent")
    monkeypatch.delenv("SOULRAY_DEBUG", raising=False)
    env = build_runtime_env(tmp_path, True, ("JUDGE_API_KEY",))
    assert env["env_vars"] == {"JUDGE_API_KEY": "sk-test"}
    assert "env_vars" not in build_runtime_env(tmp_path, True)
    monkeypatch.delenv("JUDGE_API_KEY")
    with pytest.raises(ValueError, match="--env JUDGE_API_KEY: the variable is not set"):
        build_runtime_env(tmp_path, True, ("JUDGE_API_KEY",))
    with pytest.raises(ValueError, match="--env takes a variable's name, not JUDGE_API_KEY=VALUE"):
        build_runtime_env(tmp_path, True, ("JUDGE_API_KEY=sk-x",))  # the value never echoed
    monkeypatch.setenv("EMPTY_ONE", "")
    assert build_runtime_env(tmp_path, True, ("EMPTY_ONE",))["env_vars"] == {"EMPTY_ONE": ""}
