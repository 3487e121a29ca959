"""Serve config, the `soulray serve build` file, the app builder, and the vllm engine's guard."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from soulray.cli import app as cli
from soulray.config import Config, ConfigError, load_config
from soulray.serve.app import build_app, build_serve_config
from soulray.serve.engine import build_engine

ROOT = Path(__file__).resolve().parents[2]


def test_jobs_serve_yaml_loads_and_model_dir_defaults_to_the_train_export():
    cfg = load_config(ROOT / "jobs" / "serve.yaml")
    assert cfg.serve.engine.kind == "hf"
    assert cfg.serve_model_dir == "runs/quickstart/model"
    assert Config().serve_model_dir == Config().train.export_dir
    with pytest.raises(ConfigError, match="serve.engine.batching"):
        load_config(None, ["serve.engine.batching.size=4"])


def test_wait_for_model_s_is_a_serve_key_in_whole_seconds():
    assert Config().serve.wait_for_model_s == 0  # fail at once, as before it existed
    assert load_config(None, ["serve.wait_for_model_s=1800"]).serve.wait_for_model_s == 1800
    with pytest.raises(ConfigError, match="Did you mean 'serve.wait_for_model_s'"):
        load_config(None, ["serve.wait_for_model=1800"])
    with pytest.raises(ConfigError, match="serve.wait_for_model_s': Input should be greater"):
        load_config(None, ["serve.wait_for_model_s=-1"])
    with pytest.raises(ConfigError, match="serve.engine.wait_for_model_s"):
        load_config(None, ["serve.engine.wait_for_model_s=60"])  # one setting, for every replica


def test_serve_build_writes_a_ray_serve_config(tmp_path, tiny_export):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve_config.yaml"
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "build",
            "--config",
            str(ROOT / "jobs" / "serve.yaml"),
            "--output",
            str(out),
            f"serve.engine.model_dir={tiny_export}",
            "serve.port=8123",
        ],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# Ray Serve config written by `soulray serve build`")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (application,) = schema.applications
    assert application.import_path == "soulray.serve.app:build_app"
    assert schema.http_options.port == 8123 and schema.http_options.host == "0.0.0.0"
    embedded = Config.model_validate(application.args["config"])
    assert embedded.serve.engine.model_dir == str(tiny_export)
    built = build_app(application.args)  # what `serve deploy` calls with these args
    # the bound deployment (Ray's Application keeps it in _bound_deployment): hf serves in one
    # deployment, the Ingress, sized by serve.engine, given the embedded config and no handle
    deployment = built._bound_deployment
    assert deployment.name == "Ingress" and len(deployment.init_args) == 1
    sized = embedded.serve.engine
    assert deployment.ray_actor_options == {"num_cpus": sized.num_cpus, "num_gpus": sized.num_gpus}
    assert (sized.num_cpus, embedded.serve.ingress.num_cpus) == (1.0, 0.25)  # not the ingress's
    assert Config.model_validate(deployment.init_args[0]) == embedded
    assert deployment.init_args[0]["serve"]["engine"]["model_dir"] == str(tiny_export)


def test_serve_build_says_the_model_path_the_file_holds(tmp_path, tiny_export, monkeypatch):
    """A relative model_dir is written absolute (a replica runs in another directory); the
    line that says what was written said it as given."""
    monkeypatch.chdir(tiny_export.parent)
    out = tmp_path / "serve_config.yaml"
    jobs = str(ROOT / "jobs" / "serve.yaml")
    args = [
        "serve",
        "build",
        "-c",
        jobs,
        "-o",
        str(out),
        f"serve.engine.model_dir={tiny_export.name}",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        f"wrote {out} (application soulray, model {tiny_export})"
    )
    written = yaml.safe_load(out.read_text().split("\n", 3)[3])
    assert written["applications"][0]["args"]["config"]["serve"]["engine"]["model_dir"] == str(
        tiny_export
    )


def test_an_adapter_on_a_merged_lora_export_is_refused(tmp_path, tiny_export):
    """A LoRA export's root is base + adapter merged; the adapter again would apply twice."""
    from soulray.serve.prompt import check_local_model_dirs

    merged = tmp_path / "lora-export"
    shutil.copytree(tiny_export, merged)
    trained = yaml.safe_load((merged / "soulray.yaml").read_text())
    trained["lora"]["enabled"] = True
    (merged / "soulray.yaml").write_text(yaml.safe_dump(trained))
    alone = load_config(None, [f"serve.engine.model_dir={merged}"])
    check_local_model_dirs(alone)  # the merged model served alone is right
    for extra in (
        f"serve.engine.adapter_dir={merged}/adapter",
        f"serve.adapters=[{{name: a, path: {merged}/adapter}}]",
    ):
        cfg = load_config(None, [f"serve.engine.model_dir={merged}", extra])
        with pytest.raises(ValueError, match=f"serve.engine.model_dir={merged}/base$"):
            check_local_model_dirs(cfg)
    check_local_model_dirs(  # the tiny export is not a LoRA run: its adapter is fine
        load_config(
            None,
            [
                f"serve.engine.model_dir={tiny_export}",
                f"serve.engine.adapter_dir={tiny_export}/adapter",
            ],
        )
    )


def test_every_local_path_a_replica_reads_is_made_absolute(tmp_path, monkeypatch):
    """Replicas under `serve deploy` or KubeRay run in another directory than the build."""
    from soulray.serve.app import resolved

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "serve.engine.model_dir=runs/model",
            "serve.engine.adapter_dir=runs/model/adapter",
            "serve.auth.api_key_file=secrets/key",
            "serve.adapters=[{name: calm, path: adapters/calm}]",
        ],
    )
    out = resolved(cfg).serve
    assert out.engine.model_dir == str(tmp_path / "runs/model")
    assert out.engine.adapter_dir == str(tmp_path / "runs/model/adapter")
    assert out.auth.api_key_file == str(tmp_path / "secrets/key")
    assert out.adapters[0].path == str(tmp_path / "adapters/calm")
    s3 = load_config(None, ["serve.engine.model_dir=s3://b/model"])
    assert resolved(s3).serve.engine.model_dir == "s3://b/model"


def test_serve_refuses_a_missing_export_before_deploying(tmp_path, tiny_export):
    def serve(*overrides: str):
        args = ["serve", "--config", str(ROOT / "jobs" / "serve.yaml"), *overrides]
        return CliRunner().invoke(cli, args)

    missing = tmp_path / "no-model"
    result = serve(f"serve.engine.model_dir={missing}")
    assert result.exit_code == 1
    assert f"error: model directory {missing} does not exist; run `soulray train` first" in (
        result.output
    )
    result = serve(f"serve.engine.model_dir={tiny_export}", f"serve.engine.adapter_dir={missing}")
    assert result.exit_code == 1 and f"model directory {missing} does not exist" in result.output


def test_serve_refuses_a_safety_locale_without_help_lines_before_deploying(tmp_path):
    """The replicas refused it: Serve said only "Deploying application soulray failed"."""
    jobs = str(ROOT / "jobs" / "serve.yaml")
    message = (
        "error: serve.safety has no resources or fixed_reply for locale 'fr-FR'; add it to "
        "serve.safety.resources and serve.safety.fixed_reply "
        "(known: ['en-US', 'zh-CN', 'zh-HK', 'zh-Hant', 'zh-TW'])"
    )
    for verb in (["serve"], ["serve", "build", "-o", str(tmp_path / "s.yaml")]):
        result = CliRunner().invoke(cli, [*verb, "--config", jobs, "serve.safety.locale=fr-FR"])
        assert result.exit_code == 1 and result.output.strip() == message


def test_serve_refuses_a_port_another_server_listens_on(monkeypatch):
    """Serve's proxy binds with SO_REUSEPORT: on a busy port it would start and share it."""
    import ray.serve.context
    from ray import serve

    from soulray.serve import app as serve_app

    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **_: None)
    monkeypatch.setattr(serve, "start", lambda **_: pytest.fail("Serve was started"))
    with socket.socket() as other:  # another server, bound as Serve's proxy binds
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg = load_config(None, [f"serve.port={port}"])
        with pytest.raises(ValueError) as e:
            serve_app.start_serving(cfg)
    assert str(e.value) == (
        f"serve.port={port} is in use on 127.0.0.1 (Address already in use): another server "
        "listens there; stop it or pick a free port with serve.port=..."
    )
    serve_app.check_port_free("127.0.0.1", port)  # free again once that server is gone
    # a driver that joined a cluster on other machines has no proxy port here to check
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.9"}])
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.5")
    assert serve_app.hosts_a_node() is False
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.9")
    assert serve_app.hosts_a_node() is True


def test_the_url_names_the_port_of_a_serve_already_running(monkeypatch):
    """A Serve already running on the cluster keeps its port: the app was served there while
    `soulray serve` and `soulray pipeline` printed a URL with the port asked for."""
    import ray.serve.context
    from ray import serve
    from ray.serve.config import HTTPOptions

    from soulray.serve import app as serve_app

    class Running:
        http_config = HTTPOptions(host="127.0.0.1", port=8123)

    warnings = []
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **_: Running())
    monkeypatch.setattr(serve, "start", lambda **_: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: None)
    # no Serve and no Ray here: nothing deployed yet, and no key-value store to mark a deploy in
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={}))
    monkeypatch.setattr(serve_app, "record_deploy", lambda name: None)
    monkeypatch.setattr(serve_app, "build_application", lambda cfg: None)
    monkeypatch.setattr(serve_app.log, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    url = serve_app.start_serving(load_config(None, ["serve.port=8124"]))
    assert url == "http://127.0.0.1:8123"
    assert warnings == [
        "serve.port=8124 is not applied: this Ray cluster's Serve already listens on port 8123 "
        "and keeps it until it is shut down (`serve shutdown` stops every app), so the app is "
        "served there"
    ]
    assert serve_app.start_serving(load_config(None, ["serve.port=8123"])) == url
    assert len(warnings) == 1  # the same port: nothing to say
    # where the quickstart sends its chat request (connected to the cluster it deployed on)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert serve_app.served_url(load_config(None, ["serve.port=8124"])) == url
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **_: None)
    assert serve_app.served_url(load_config(None, ["serve.port=8124"])) == "http://127.0.0.1:8124"


def test_builder_refuses_unknown_args():
    with pytest.raises(ValueError, match="unknown application args"):
        build_app({"config": {}, "conf": {}})


def test_vllm_engine_without_vllm_fails_clearly():
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    cfg = Config.model_validate({"serve": {"engine": {"kind": "vllm"}}})
    with pytest.raises(ValueError, match="vLLM, which is not installed.*serve.engine.kind=hf"):
        build_engine(cfg.serve, "/tmp/model")


def test_build_serve_config_embeds_only_the_serve_section(tiny_export):
    cfg = Config.model_validate(
        {"train": {"export_dir": str(tiny_export), "steps": 7}, "serve": {"model_name": "x"}}
    )
    built = build_serve_config(cfg)
    embedded = built["applications"][0]["args"]["config"]
    assert list(embedded) == ["serve"]
    assert embedded["serve"]["engine"]["model_dir"] == str(tiny_export)
    assert embedded["serve"]["model_name"] == "x"


def test_one_deployment_layout_runs_the_engine_inside_the_ingress(tiny_export):
    """serve.layout=one_deployment: a single Ingress deployment, sized by serve.engine, whose
    replica builds the engine itself (the same answers, one hop less); vllm is refused."""
    import asyncio

    from soulray.serve.app import build_application, build_engine_client
    from soulray.serve.engine import LocalClient
    from soulray.serve.generate import GenRequest

    serve = {"layout": "one_deployment", "engine": {"model_dir": str(tiny_export), "num_cpus": 2}}
    cfg = Config.model_validate({"serve": serve})
    app = build_application(cfg)
    deployment = app._bound_deployment
    assert deployment.name == "Ingress" and deployment.ray_actor_options["num_cpus"] == 2
    assert len(deployment.init_args) == 1  # the config only: no engine handle to call
    client = build_engine_client(cfg, None)
    assert isinstance(client, LocalClient)
    ids = client.engine.scheduler.tokenizer("hello").input_ids
    (reply,) = asyncio.run(client.complete(GenRequest("r", ids, 5, 0.0, 1.0)))
    assert reply.tokens == 5 and reply.finish_reason == "length"
    # what vllm cannot do is refused when the config is read (`serve build` too), not on deploy
    with pytest.raises(ValueError, match="serve.layout=two_deployments"):
        Config.model_validate({"serve": {**serve, "engine": {"kind": "vllm"}}})
    adapters = {"adapters": [{"name": "a", "path": "/x/adapter"}], "engine": {"kind": "vllm"}}
    with pytest.raises(ValueError, match="serve.adapters .multi-LoRA. is served by the hf engine"):
        Config.model_validate({"serve": adapters})
    with pytest.raises(ValueError, match="unset serve.engine.adapter_dir"):
        Config.model_validate({"serve": {"engine": {"kind": "vllm", "adapter_dir": "/x/a"}}})
    # the ingress would wait for the export while the vllm engine failed to load it
    wait = {"engine": {"kind": "vllm"}, "wait_for_model_s": 600}
    with pytest.raises(ValueError, match="set serve.wait_for_model_s=0 and deploy once the export"):
        Config.model_validate({"serve": wait})


@pytest.mark.parametrize("layout", ["one_deployment", "two_deployments"])
def test_the_ingress_sheds_past_max_queued_requests_with_retry_after(tiny_export, layout):
    """The proxy answers a request past the ingress's max_queued_requests itself: with
    Retry-After: 1, as soulray's own 503s; it sent none, so clients retried at once."""
    from soulray.serve.app import build_application

    engine = {"kind": "noop", "model_dir": str(tiny_export)}
    cfg = Config.model_validate({"serve": {"layout": layout, "engine": engine}})
    deployment = build_application(cfg)._bound_deployment
    assert deployment.name == "Ingress"
    assert deployment.backpressure_config.status_code == 503
    assert deployment.backpressure_config.retry_after_s == 1


def test_layout_auto_puts_the_hf_engine_in_the_ingress_and_vllm_apart():
    from soulray.config import ServeConfig

    def layout(**serve) -> str:
        return ServeConfig.model_validate(serve).resolved_layout()

    assert ServeConfig().layout == "auto"
    assert layout() == "one_deployment"
    assert layout(engine={"kind": "noop"}) == "one_deployment"
    assert layout(engine={"kind": "vllm"}) == "two_deployments"
    assert layout(layout="two_deployments") == "two_deployments"
    with pytest.raises(ValueError, match="layout"):
        ServeConfig.model_validate({"layout": "one"})


def test_an_adapter_path_that_is_no_adapter_is_refused_before_deploying(tmp_path, tiny_export):
    """Adapters load at their first request: a wrong path would pass /healthz and then fail
    every request for it. `serve build` refuses an adapter on a merged LoRA export too."""
    from typer.testing import CliRunner

    from soulray.cli import app
    from soulray.serve.prompt import check_local_model_dirs

    base = [f"serve.engine.model_dir={tiny_export}"]
    for extra, key in (
        (f"serve.engine.adapter_dir={tiny_export}", "serve.engine.adapter_dir"),
        (f"serve.adapters=[{{name: a, path: {tmp_path}}}]", "serve.adapters[0].path"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(key)}=.* is not a peft LoRA adapter"):
            check_local_model_dirs(load_config(None, [*base, extra]))
    merged = tmp_path / "lora-export"
    shutil.copytree(tiny_export, merged)
    trained = yaml.safe_load((merged / "soulray.yaml").read_text())
    trained["lora"]["enabled"] = True
    (merged / "soulray.yaml").write_text(yaml.safe_dump(trained))
    args = ["serve", "build", "--config", str(ROOT / "jobs" / "serve.yaml")]
    args += [f"serve.engine.model_dir={merged}", "-o", str(tmp_path / "s.yaml")]
    result = CliRunner().invoke(app, [*args, f"serve.engine.adapter_dir={merged}/adapter"])
    assert result.exit_code == 1
    assert "is the merged export of a LoRA run" in result.output


def test_a_model_dir_that_is_no_model_is_refused_before_deploying(tmp_path, tiny_export):
    """A run's checkpoints (no config.json) crashed every replica in transformers, and Serve
    said only "Deploying application soulray failed"."""
    from soulray.serve.prompt import check_local_model_dirs

    checkpoints = tmp_path / "checkpoints" / "run"
    (checkpoints / "checkpoint_00000002").mkdir(parents=True)
    (checkpoints / "metrics.jsonl").write_text("{}\n")
    cfg = load_config(None, [f"serve.engine.model_dir={checkpoints}"])
    with pytest.raises(ValueError) as e:
        check_local_model_dirs(cfg)
    assert str(e.value).startswith(
        f"serve.engine.model_dir={checkpoints} is not a model directory (no config.json there)"
    )
    check_local_model_dirs(load_config(None, [f"serve.engine.model_dir={tiny_export}"]))


def test_serve_auth_required_without_a_key_is_refused_before_deploying(tiny_export, monkeypatch):
    """On a local Ray the replicas see this environment: the ingress's refusal was a
    "Deploying application failed" traceback, its reason in the replica log."""
    from typer.testing import CliRunner

    from soulray.cli import app

    monkeypatch.delenv("SOULRAY_API_KEY", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a Ray of its own, whatever else runs here
    args = ["serve", "--config", str(ROOT / "jobs" / "serve.yaml")]
    args += [f"serve.engine.model_dir={tiny_export}", "serve.auth.required=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: serve.auth.required is set but no API key was found")
