"""`soulray pipeline`: stages under one run directory, and a re-run after the driver was killed
mid-training skips the finished prepare and resumes training from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from soulray_testing import QUICKSTART, ROOT, SOULRAY

from soulray.config import config_hash, load_config
from soulray.pipeline import with_run_dir


def pipeline_cmd(run_dir: Path) -> list[str]:
    return [
        SOULRAY,
        "pipeline",
        "--config",
        str(QUICKSTART),
        f"pipeline.run_dir={run_dir}",
        "pipeline.stages=[prepare, train]",
        "train.steps=16",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.eval_every=0",
    ]


def test_run_dir_places_every_stage_under_it() -> None:
    cfg = with_run_dir(load_config(QUICKSTART, ["pipeline.run_dir=s3://b/run"]))
    assert (cfg.data.output_dir, cfg.train.storage_path, cfg.train.export_dir) == (
        "s3://b/run/data",
        "s3://b/run/checkpoints",
        "s3://b/run/model",
    )
    assert cfg.serve_model_dir == "s3://b/run/model"


def test_rerun_after_a_killed_driver_resumes_instead_of_starting_over(tmp_path) -> None:
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, killed with it
    metrics = tmp_path / "checkpoints" / "quickstart" / "metrics.jsonl"
    first = subprocess.Popen(
        pipeline_cmd(tmp_path),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 6:  # checkpoint 4 is on disk
            break
        time.sleep(0.2)
    assert first.poll() is None, "the pipeline ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 6 <= killed_at < 16
    assert not (tmp_path / "model").exists()

    again = subprocess.run(
        pipeline_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "prepare  skipped" in again.stdout
    assert "train    ran" in again.stdout and "step 16" in again.stdout
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 17))  # every step once, none lost
    (resumed,) = {m["start_step"] for m in steps if m["start_step"] > 0}
    last_checkpoint = killed_at // 4 * 4  # the newest one, unless the kill hit its writing
    assert resumed in (last_checkpoint, last_checkpoint - 4) and resumed >= 4
    assert {m["start_step"] for m in steps if m["step"] <= resumed} == {0}
    assert {m["start_step"] for m in steps if m["step"] > resumed} == {resumed}
    assert (tmp_path / "model" / "model.safetensors").exists()

    third = subprocess.run(
        pipeline_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "prepare  skipped" in third.stdout and "train    skipped" in third.stdout

    # new inputs: prepare would train another tokenizer on them, whose ids the run's
    # checkpoints are not of; refused before the data is replaced (the export was made again
    # from the same checkpoint, a model of data that was gone, or a resume trained on other ids)
    exported = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    prepared = (tmp_path / "data" / "manifest.json").read_text()
    corpus = tmp_path / "more.jsonl"
    samples = [
        (ROOT / "jobs" / "data" / n).read_text() for n in ("sample_zh.jsonl", "sample_en.jsonl")
    ]
    one_more = {
        "messages": [
            {"role": "user", "content": "My sister stopped answering my calls this week."},
            {"role": "assistant", "content": "That silence sounds worrying. What happened last?"},
        ]
    }
    corpus.write_text("".join(samples) + json.dumps(one_more) + "\n")
    fourth = subprocess.run(
        [*pipeline_cmd(tmp_path), f"data.inputs=[{corpus}]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fourth.returncode == 1, fourth.stdout[-3000:]
    assert (
        "error: train.run_name=quickstart has checkpoints trained on the tokenizer prepare "
        f"trained on the corpus in {tmp_path}/data; data.inputs or data.* changed" in fourth.stderr
    ), fourth.stderr[-3000:]
    assert "Set a new train.run_name" in fourth.stderr
    assert (tmp_path / "data" / "manifest.json").read_text() == prepared
    assert len(metrics.read_text().splitlines()) == 16  # no step trained again
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == exported


def test_an_export_made_with_a_kept_lr_still_counts_as_this_config(tmp_path) -> None:
    """A resume keeps the checkpoint's lr (and says so) and the export records that lr: the
    config that asked for another one made this same export, so the train stage is skipped."""

    from soulray.config import config_to_yaml
    from soulray.pipeline import trained_metrics
    from soulray.train.launch import resolve_paths

    def config(*overrides: str):
        paths = [f"data.output_dir={tmp_path}/data", f"train.storage_path={tmp_path}/ckpt"]
        return load_config(None, [*paths, f"train.export_dir={tmp_path}/model", *overrides])

    export = tmp_path / "model"
    export.mkdir()
    (export / "soulray.yaml").write_text(config_to_yaml(resolve_paths(config("train.lr=0.001"))))
    (export / "metrics.json").write_text(json.dumps({"step": 100, "loss": 1.5}))
    assert trained_metrics(config("train.lr=0.001")) == {"step": 100, "loss": 1.5}
    assert trained_metrics(config("train.lr=0.01")) == {"step": 100, "loss": 1.5}  # kept
    assert trained_metrics(config("train.steps=200")) is None  # more to train
    assert trained_metrics(config("train.seed=1")) is None  # another run
    (export / "_INCOMPLETE").write_text("")  # training died while writing the export
    assert trained_metrics(config("train.lr=0.001")) is None


def test_the_quickstart_hint_serves_the_model_it_trained() -> None:
    """`soulray serve` does not apply pipeline.run_dir: the printed command names the export."""
    from soulray.cli import serve_overrides

    given = ["pipeline.run_dir=runs/x", "serve.port=8123"]
    cfg = load_config(QUICKSTART, given)
    assert serve_overrides(given, cfg) == (
        " pipeline.run_dir=runs/x serve.port=8123 serve.engine.model_dir=runs/x/model"
    )
    assert load_config(QUICKSTART, serve_overrides(given, cfg).split()).serve_model_dir == (
        "runs/x/model"
    )


def test_quickstart_on_a_cluster_it_joined_stops_its_own_app_only(monkeypatch) -> None:
    """It ended with serve.shutdown(): submitted to a cluster (or run beside `ray start`), that
    stopped every Serve app there, other people's included."""
    from types import SimpleNamespace

    from ray import serve
    from typer.testing import CliRunner

    import soulray.cli
    import soulray.pipeline
    import soulray.serve.client

    reply = SimpleNamespace(
        model_extra={},
        choices=[SimpleNamespace(message=SimpleNamespace(content="hello"))],
        usage=SimpleNamespace(prompt_tokens=3, completion_tokens=1),
    )
    stopped = []
    monkeypatch.setattr(soulray.cli, "init_ray", lambda: None)
    monkeypatch.setattr(soulray.pipeline, "run_pipeline", lambda cfg: [])
    monkeypatch.setattr(soulray.serve.client, "ask_once", lambda *a: reply)
    monkeypatch.setattr(serve, "shutdown", lambda: stopped.append("all of Serve"))
    monkeypatch.setattr(serve, "delete", lambda name: stopped.append(name))
    args = ["quickstart", "--config", str(QUICKSTART), "serve.app_name=qs"]
    for address, expected in (("127.0.0.1:6379", "qs"), ("local", "all of Serve")):
        monkeypatch.setenv("RAY_ADDRESS", address)
        stopped.clear()
        result = CliRunner().invoke(soulray.cli.app, args)
        assert result.exit_code == 0, result.output
        assert stopped == [expected]


def test_prepare_runs_again_when_its_input_files_changed(tmp_path, prepared_quickstart, caplog):
    """A record fixed in an input after prepare was left out: the stage was skipped on the
    config alone. Inputs that are gone keep the prepared data (preparing again would fail)."""
    import shutil

    from soulray import storage
    from soulray.data.manifest import read_manifest
    from soulray.pipeline import prepared_manifest

    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(ROOT / "jobs" / "data" / "sample_en.jsonl", corpus)
    data = tmp_path / "data"
    shutil.copytree(prepared_quickstart, data)
    cfg = load_config(QUICKSTART, [f"data.inputs=[{corpus}]", f"data.output_dir={data}"])
    manifest = read_manifest(str(data))
    # what prepare records (the fixture's own inputs), then as if it had read this corpus
    samples = [str(ROOT / "jobs" / "data" / n) for n in ("sample_zh.jsonl", "sample_en.jsonl")]
    assert manifest["inputs_fingerprint"] == storage.files_fingerprint(storage.input_files(samples))
    manifest["config_hash"] = config_hash(cfg.data)
    manifest["inputs_files"] = storage.input_files([str(corpus)])
    manifest["inputs_fingerprint"] = storage.files_fingerprint(manifest["inputs_files"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert prepared_manifest(cfg) == manifest
    with corpus.open("a") as f:
        f.write(corpus.read_text().splitlines()[0] + "\n")  # one more record
    with caplog.at_level("INFO", logger="soulray"):
        assert prepared_manifest(cfg) is None
    assert f"prepare: data.inputs changed since {data} was prepared" in caplog.text
    corpus.unlink()
    assert prepared_manifest(cfg) == manifest
    # a manifest of an older soulray (paths, sizes and times): compared as it was made
    legacy = {**manifest, "inputs_fingerprint": storage.stat_fingerprint([str(corpus)])}
    del legacy["inputs_files"]
    (data / "manifest.json").write_text(json.dumps(legacy))
    assert prepared_manifest(cfg) == legacy
    # an older prepare's manifest records no inputs: not said to have changed, not redone
    shutil.copy(ROOT / "jobs" / "data" / "sample_en.jsonl", corpus)
    del manifest["inputs_fingerprint"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level("INFO", logger="soulray"):
        assert prepared_manifest(cfg) == manifest
    assert "data.inputs changed" not in caplog.text


def test_prepare_is_not_run_again_for_a_setting_that_does_not_decide_the_rows(
    tmp_path, prepared_quickstart
):
    """More render actors (data.num_workers) or the prepared folder moved (data.output_dir)
    prepared a whole corpus again: the manifest's config_hash covered all of data.*."""
    import shutil

    from soulray.data.manifest import data_config_hash, read_manifest
    from soulray.pipeline import prepared_manifest

    data = tmp_path / "moved"
    shutil.copytree(prepared_quickstart, data)
    manifest = read_manifest(str(data))
    base = load_config(QUICKSTART, [f"data.output_dir={prepared_quickstart}"])
    assert manifest["config_hash"] == data_config_hash(base.data)
    for extra in ([], ["data.num_workers=7"]):
        cfg = load_config(QUICKSTART, [f"data.output_dir={data}", *extra])
        assert prepared_manifest(cfg) == manifest
    for decides in ("data.seq_len=512", "data.seed=1", "data.mode=padded"):
        cfg = load_config(QUICKSTART, [f"data.output_dir={data}", decides])
        assert prepared_manifest(cfg) is None, decides
    # a manifest from before stop 44 hashed all of data.*: compared as it was made
    cfg = load_config(QUICKSTART, [f"data.output_dir={data}", "data.num_workers=7"])
    (data / "manifest.json").write_text(
        json.dumps({**manifest, "config_hash": config_hash(cfg.data)})
    )
    assert prepared_manifest(cfg) is not None
    cfg = load_config(QUICKSTART, [f"data.output_dir={data}", "data.num_workers=3"])
    assert prepared_manifest(cfg) is None


def test_a_pipeline_waits_on_its_own_ray_and_returns_on_a_cluster_it_joined() -> None:
    """A `soulray pipeline` submitted as a Ray job waited for Ctrl-C after deploying, so the job
    ran until stopped; unset, pipeline.wait now waits only where the app ends with the command."""
    from soulray.cli import pipeline_waits
    from soulray.config import load_config

    unset, on, off = (
        load_config(None, o) for o in ([], ["pipeline.wait=true"], ["pipeline.wait=false"])
    )
    assert unset.pipeline.wait is None
    assert [pipeline_waits(c, own_ray=True) for c in (unset, on, off)] == [True, True, False]
    assert [pipeline_waits(c, own_ray=False) for c in (unset, on, off)] == [False, True, False]


def test_a_pipeline_refuses_what_train_would_refuse_before_preparing_again(tmp_path) -> None:
    """Another data.seq_len made prepare replace the prepared data, and then train refused it
    (the checkpoints count rows of the old length): the data was lost for nothing."""
    import pytest

    from soulray.config import CONFIG_FILE, config_to_yaml
    from soulray.pipeline import run_pipeline

    run = ["pipeline.run_dir=" + str(tmp_path), "pipeline.stages=[prepare,train]"]
    trained = load_config(QUICKSTART, run)
    checkpoint = tmp_path / "checkpoints" / trained.train.run_name / "checkpoint_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / CONFIG_FILE).write_text(config_to_yaml(with_run_dir(trained)))
    prepared = tmp_path / "data" / "manifest.json"
    prepared.parent.mkdir()
    prepared.write_text("{}")
    with pytest.raises(ValueError) as e:
        run_pipeline(load_config(QUICKSTART, [*run, "data.seq_len=512"]))
    assert str(e.value).startswith(
        f"train.run_name={trained.train.run_name} has checkpoints made with another "
        "data.seq_len (the data position counts rows of that length)"
    )
    assert prepared.read_text() == "{}"


def test_a_pipeline_refuses_a_serve_stage_serve_would_refuse_before_preparing(tmp_path) -> None:
    """A locale without a help line for a category: `soulray serve` refuses it at start, and
    the pipeline did only after prepare and train (then Serve's deploy failed with a bare
    traceback and took the running app down; a review, stop 42)."""
    import pytest

    from soulray.pipeline import run_pipeline

    lines = "serve.safety.resources={en-US: [{name: a, contact: b, categories: [suicide]}]}"
    cfg = load_config(QUICKSTART, ["pipeline.run_dir=" + str(tmp_path / "run"), lines])
    with pytest.raises(ValueError, match="no help line for self_harm, violence, abuse"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()  # nothing prepared
