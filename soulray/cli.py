"""The `soulray` command line: one verb per stage, configured by YAML + `a.b=value` overrides."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from soulray.config import Config, ConfigError, load_config

app = typer.Typer(
    help="Train and serve empathetic-support language models on Ray.\n\n"
    "Every verb but chat, report and submit takes --config FILE.yaml and any number of dotted "
    "overrides, "
    "e.g. `soulray prepare --config jobs/quickstart.yaml data.seq_len=1024`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("soulray")

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config (see jobs/).", show_default=False)
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. data.output_dir=runs/x train.steps=100."),
]


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def init_ray() -> None:
    """Join the Ray cluster in RAY_ADDRESS (a submitted job, or a verb run against a cluster),
    or start a local one."""
    address = os.environ.get("RAY_ADDRESS", "")
    checked = address not in ("", "local") and check_cluster_address(address)
    import ray

    if ray.is_initialized():
        return
    # a local Ray inherits this process's environment: Serve's proxy gets 30 s to start, not 5
    # (on a busy 2-CPU machine it took longer, was killed, and `serve.start` failed)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    try:
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as e:
        if not address or address == "local":
            raise
        token = (  # something answered there: most often a cluster that wants its token
            "; a cluster with token authentication (Ray's default) needs its token here "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            if checked
            else ""
        )
        typer.echo(
            f"error: could not join the Ray cluster at RAY_ADDRESS={address}: {e}{token}; or "
            "unset RAY_ADDRESS to run on a local Ray",
            err=True,
        )
        raise typer.Exit(1) from None


def starts_its_own_ray() -> bool:
    """Whether init_ray starts a Ray here rather than joining one: RAY_ADDRESS unset or "local",
    and, when unset, no `ray start` cluster on this machine (which ray.init would join)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        return address == "local"
    from ray._private.utils import read_ray_address

    return read_ray_address() is None


def send_cluster_token() -> None:
    """A verb run against a cluster (RAY_ADDRESS, but not "local", which starts its own) sends
    the cluster's token when this machine has one, as `soulray submit` does. Ray reads
    RAY_AUTH_MODE once, when it is imported, and some verbs import it before starting Ray: so
    this runs before any verb (main)."""
    if os.environ.get("RAY_ADDRESS", "") not in ("", "local"):
        from soulray.submit import send_token_if_present

        send_token_if_present()


def check_cluster_address(address: str) -> bool:
    """RAY_ADDRESS=HOST:PORT where nothing listens: ray.init would retry for ever, printing a
    warning every 30 s. Refused at once, naming the fix; True when something answered there
    (False: not a HOST:PORT address, left to Ray)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # auto, ray://: Ray's own
        return False
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        typer.echo(
            f"error: no Ray cluster answers at RAY_ADDRESS={address} ({e.strerror or e}): "
            "start one there (`ray start --head`; its GCS port is 6379 by default), correct "
            "the address, or unset RAY_ADDRESS to run on a local Ray",
            err=True,
        )
        raise typer.Exit(1) from None
    return True


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside a (possibly Ray-wrapped) exception, if there is one."""
    from soulray.data.pipeline import StrictModeError

    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError | StrictModeError | FileNotFoundError):
            return e
        if isinstance(e, ValueError) and type(e).__module__.startswith("soulray"):
            return e
        failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError
        if isinstance(failures, dict):
            for failure in failures.values():  # a worker's own ValueError is the user's error
                if type(failure) is ValueError:
                    return failure
                stack += [failure] if isinstance(failure, BaseException) else []
        # `raise ... from None` hides the context: its error is not the one to show
        context = None if e.__suppress_context__ else e.__context__
        for nxt in (getattr(e, "cause", None), e.__cause__, context):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return exc if type(exc) is ValueError else None


def run_verb(fn: Any, *args: Any) -> Any:
    """Run a stage; a user error prints one clear line and exits non-zero (no traceback;
    SOULRAY_DEBUG=1 keeps it)."""
    try:
        return fn(*args)
    except Exception as exc:
        found = user_error(exc)
        if found is None or os.environ.get("SOULRAY_DEBUG"):
            raise
        typer.echo(f"error: {found}", err=True)
        raise typer.Exit(2 if isinstance(found, ConfigError) else 1) from None


def as_config_error(check: Any) -> Any:
    """`check` with its ValueError raised as a ConfigError (exit 2)."""

    def checked(*args: Any) -> Any:
        try:
            return check(*args)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e

    return checked


def load(config: Path, overrides: list[str] | None) -> Config:
    return run_verb(load_config, config, overrides or [])


@app.command()
def prepare(
    config: ConfigOpt,
    overrides: Overrides = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad record (file and line).")
    ] = False,
) -> None:
    """Read, clean, render and pack corpora into Parquet shards with Ray Data."""
    from soulray.data.pipeline import check_prepare, run_prepare

    setup_logging()
    cfg = load(config, [*(overrides or []), *(["data.strict=true"] if strict else [])])
    run_verb(check_prepare, cfg)  # before Ray starts: a wrong path is said at once
    init_ray()
    manifest = run_verb(run_prepare, cfg)
    print_prepare_summary(manifest, cfg)


def print_prepare_summary(m: dict[str, Any], cfg: Config) -> None:
    rejected = sum(m["rejected"].values())
    typer.echo(
        f"prepared {m['conversations']} conversations ({rejected} rejected: "
        f"{json.dumps(m['rejected'], ensure_ascii=False)}"
        + (
            f"; {m['collapsed_prefixes']} earlier samples of longer dialogues collapsed into them"
            if m.get("collapsed_prefixes")
            else ""
        )
        + "), "
        f"{m['assistant_turns']} assistant turns, "
        f"{m['tokens']} tokens ({m['target_tokens']} targets) in {m['rows']} rows of "
        f"{m['seq_len']}, packing efficiency {m['packing_efficiency']:.2%}"
        + (
            f"; {m['replies_without_room']} replies not trained (no room beside what they "
            "answer: raise data.seq_len)"
            if m.get("replies_without_room")
            else ""
        )
        + "\n"
        f"  output: {cfg.data.output_dir} (manifest.json, rejects.jsonl, train/, val/, tokenizer/)"
    )


@app.command()
def train(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Fine-tune on the prepared data with Ray Train (FSDP2; full or LoRA) and export the model."""
    from soulray.train.launch import check_training, latest_checkpoint_step, run_train

    setup_logging()
    cfg = load(config, overrides)
    cfg = run_verb(check_training, cfg)  # before Ray starts: a missing data dir is said at once
    resumed_from = latest_checkpoint_step(cfg)
    init_ray()
    with sigterm_as_ctrl_c():
        result = run_verb(run_train, cfg, True)
    print_train_summary(result, cfg, resumed_from)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM (what Kubernetes and `ray job stop` send) inside this block is handed to the
    SIGINT handler, so it stops as Ctrl-C does: Ray Train's handler aborts the run, which says
    its latest checkpoint. Ray's own SIGTERM handler aborted the process with a stack dump
    (exit 134, read as a crash); the command ends with 143 (128 + SIGTERM) instead. The list
    yielded holds the signal once it came."""
    import signal

    got: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        if got:  # once: a second signal must not cut the abort
            return
        got.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    except (typer.Exit, KeyboardInterrupt):
        if got:
            raise typer.Exit(143) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_train_summary(result: Any, cfg: Config, resumed_from: int = 0) -> None:
    if result.error is not None:
        typer.echo(f"error: training failed: {result.error}", err=True)
        raise typer.Exit(1)
    m = result.metrics or {}
    val = f", val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    if resumed_from == cfg.train.steps:  # a finished run started again: only the export ran
        done = f"{cfg.train.run_name} was already at step {resumed_from}: nothing to train"
    else:
        resumed = f" (resumed from step {resumed_from})" if resumed_from else ""
        done = f"trained {cfg.train.run_name} to step {m.get('step')}{resumed}"
    typer.echo(
        f"{done}: loss {m.get('loss', float('nan')):.4f}"
        f"{val}, {m.get('tokens_per_s', 0):.0f} tokens/s\n"
        f"  checkpoints: {cfg.train.storage_path}/{cfg.train.run_name}\n"
        f"  model: {cfg.train.export_dir} (load with AutoModelForCausalLM.from_pretrained)"
    )


@app.command(name="serve")
def serve_cmd(
    config: ConfigOpt,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dotted overrides; start with `build` (soulray serve build --config ...) to "
            "write a Ray Serve config file for `serve deploy` / a KubeRay RayService instead.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where `soulray serve build` writes.")
    ] = Path("serve_config.yaml"),
) -> None:
    """Serve the exported model: OpenAI-compatible API on Ray Serve (prints the URL, blocks)."""
    words = list(args or [])
    build = bool(words) and words[0] == "build"
    cfg = load(config, words[1:] if build else words)
    if build:
        run_verb(write_serve_config, cfg, output)
        return
    from soulray.safety.screen import build_screen
    from soulray.serve.app import start_serving
    from soulray.serve.prompt import check_local_model_dirs

    # A missing export would otherwise surface as Serve's "Deploying application failed" after
    # the replicas crash, with the reason buried in their logs. (Logging first: a
    # serve.wait_for_model_s wait says so here.)
    setup_logging()
    run_verb(build_screen, cfg.serve.safety)  # serve.safety: a locale with no help lines, say
    run_verb(check_local_model_dirs, cfg)
    if starts_its_own_ray():  # its replicas see this environment
        from soulray.serve.app import load_api_key

        run_verb(load_api_key, cfg.serve.auth)  # serve.auth.required without a key, say
    init_ray()
    with stop_on_interrupt(cfg.serve.app_name):
        url = run_verb(start_serving, cfg)
        typer.echo(
            f"serving {cfg.serve.model_name} at {url}/v1 (OpenAI API; GET {url}/healthz)\n"
            f"  try: soulray chat --url {url}\n  Ctrl-C or SIGTERM stops it.",
        )
        while True:
            time.sleep(3600)


def write_serve_config(cfg: Config, output: Path) -> None:
    import yaml

    from soulray import storage
    from soulray.safety.screen import build_screen
    from soulray.serve.app import build_serve_config, resolved
    from soulray.serve.prompt import check_merged_root

    build_screen(cfg.serve.safety)  # serve.safety the replicas would refuse
    check_merged_root(cfg)  # an adapter on a merged LoRA export, which serve would refuse
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {output}: cannot create its folder ({e.strerror})") from None
    output.write_text(
        f"# Ray Serve config written by `soulray serve build`. Deploy with:\n"
        f"#   serve deploy {output}\n"
        "# or paste `applications:` into a KubeRay RayService's serveConfigV2.\n"
        + yaml.safe_dump(build_serve_config(cfg), sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    s = resolved(cfg).serve  # the paths as the file holds them: absolute
    typer.echo(f"wrote {output} (application {cfg.serve.app_name}, model {s.engine.model_dir})")
    paths = [s.engine.model_dir, s.engine.adapter_dir, *(a.path for a in s.adapters)]
    local = [p for p in [*paths, s.auth.api_key_file] if p and not storage.is_remote(p)]
    if local:
        typer.echo(
            f"  note: every replica must see {', '.join(local)} at that path (a shared volume; "
            "models may also be s3://... / gs://...)"
        )


def wait_until_interrupted(app_name: str) -> None:
    """Block until Ctrl-C or SIGTERM, then stop the app (see stop_on_interrupt)."""
    with stop_on_interrupt(app_name):
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def stop_on_interrupt(app_name: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM (what Kubernetes sends) inside this block deletes the app: Serve lets
    each replica finish its in-flight requests (graceful_shutdown_timeout_s) before stopping.
    Entered before deploying, so a signal that arrives while Serve starts is handled too (Ray's
    own handler would abort with a stack dump). An app another soulray serve or pipeline has
    deployed since this process did is left serving: it is that one's now."""
    import signal

    from ray import serve

    from soulray.serve.app import deployed_here_last

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the drain
        try:
            if not deployed_here_last(app_name):
                typer.echo(
                    f"stopped; {app_name} was deployed again by another soulray serve or "
                    "pipeline after this one deployed it: left serving"
                )
                return
            typer.echo("stopping: finishing in-flight requests")
            if app_name in serve.status().applications:
                serve.delete(app_name)
        except TimeoutError:  # Serve gives up after 60 s; the replicas are killed with Ray
            typer.echo("stopped (requests still running after 60 s were cut off)", err=True)
            return
        typer.echo("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def chat(
    url: Annotated[str, typer.Option(help="Base URL of the endpoint.")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="Model id; default: the first listed.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer key; default: $SOULRAY_API_KEY or $OPENAI_API_KEY.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
) -> None:
    """Chat in the terminal with any OpenAI-compatible endpoint (multi-turn, streaming)."""
    import openai

    from soulray.serve.client import run_chat

    try:
        run_chat(url, model, api_key, max_tokens)
    except openai.APIConnectionError:
        typer.echo(f"error: cannot reach {url}; is `soulray serve` running?", err=True)
        raise typer.Exit(1) from None
    except openai.APIStatusError as e:
        typer.echo(f"error: the server answered {e.status_code}: {e.message}", err=True)
        raise typer.Exit(1) from None


@app.command()
def synth(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Role-play strategy-annotated support dialogues (Seeker / Counselor / Supporter) with Ray
    Data against OpenAI-compatible endpoints; a re-run resumes."""
    from soulray.synth.job import check_cast, run_synth

    setup_logging()
    cfg = load(config, overrides)
    run_verb(check_cast, cfg.synth)  # before Ray starts: a wrong file or key is said at once
    init_ray()
    report = run_verb(run_synth, cfg)
    print_synth_summary(report, cfg)


def print_synth_summary(report: dict[str, Any], cfg: Config) -> None:
    from soulray.synth.output import report_path

    d, run = report["dialogues"], report["run"]
    typer.echo(
        f"synth: {run['written']} dialogues written this run ({run['dropped']} dropped, "
        f"{run['failed']} failed), {run['generated_tokens_per_s']:.0f} generated tokens/s\n"
        f"  output: {d['written']} dialogues in {cfg.synth.output_dir} "
        f"(dropped: {json.dumps(d['dropped'], ensure_ascii=False)}, "
        f"failed: {json.dumps(d['failed'], ensure_ascii=False)})\n"
        f"  report: {report_path(cfg.synth.output_dir)}\n"
        f"  next: soulray prepare --config YOUR.yaml data.inputs=[{cfg.synth.output_dir}]"
        f"{taxonomy_overrides(cfg)}"
    )


def taxonomy_overrides(cfg: Config) -> str:
    """With a custom synth taxonomy, the data.strategies overrides that make prepare keep its
    names (without them prepare maps every one it does not know to its fallback)."""
    if cfg.synth.taxonomy_file is None:
        return ""
    import shlex

    from soulray.synth.strategies import load_taxonomy

    section = load_taxonomy(cfg.synth.taxonomy_file).strategy_config()
    overrides = [  # JSON is YAML: names such as "Yes" or "A: b" keep their spelling
        f"data.strategies.taxonomy={json.dumps(section.taxonomy, ensure_ascii=False)}",
        "data.strategies.aliases={}",
        f"data.strategies.fallback={json.dumps(section.fallback, ensure_ascii=False)}",
    ]
    return "".join(f" {shlex.quote(o)}" for o in overrides)


def serve_overrides(overrides: list[str] | None, cfg: Config) -> str:
    """The overrides a run was given and the model it exported, quoted for a shell, so the
    printed serve command serves that model (`soulray serve` does not apply pipeline.run_dir)."""
    import shlex

    from soulray.pipeline import with_run_dir

    model = f"serve.engine.model_dir={with_run_dir(cfg).train.export_dir}"
    return "".join(f" {shlex.quote(o)}" for o in [*(overrides or []), model])


@app.command()
def quickstart(config: ConfigOpt, overrides: Overrides = None) -> None:
    """The whole pipeline, tiny, on local Ray: prepare -> train -> export -> serve -> one chat."""
    from ray import serve

    from soulray.pipeline import format_summary, run_pipeline
    from soulray.serve.app import served_url
    from soulray.serve.client import ask_once

    setup_logging()
    cfg = load(config, [*(overrides or []), "pipeline.stages=[prepare, train, serve]"])
    own_ray = starts_its_own_ray()
    init_ray()
    with sigterm_as_ctrl_c():
        results = run_verb(run_pipeline, cfg)
    typer.echo(format_summary(results))
    url = served_url(cfg)  # a cluster's Serve may hold another port than serve.port
    question = "I moved to a new city for work and I feel so lonely in the evenings."
    reply = run_verb(ask_once, url, question, cfg.serve.model_name)
    extra = reply.model_extra or {}
    typer.echo(
        f"\nPOST {url}/v1/chat/completions  (user) {question}\n"
        f"  (assistant, strategy={extra.get('strategy')}) {reply.choices[0].message.content!r}\n"
        f"  usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} "
        "completion tokens\n"
        f"\nThe tiny model trained for {cfg.train.steps} steps on {len(cfg.data.inputs)} small "
        "files, so its words are not yet meaningful; the pipeline is. Keep the endpoint up with\n"
        f"  soulray serve --config {config}{serve_overrides(overrides, cfg)}\nand talk to it with\n"
        f"  soulray chat --url {url}"
    )
    if own_ray:
        serve.shutdown()
    else:  # a cluster it joined (a Ray job, `ray start`): other apps serve there
        serve.delete(cfg.serve.app_name)


@app.command()
def pipeline(config: ConfigOpt, overrides: Overrides = None) -> None:
    """prepare -> train -> export -> serve on the current Ray; finished stages are skipped."""
    from soulray.pipeline import format_summary, run_pipeline

    setup_logging()
    cfg = load(config, overrides)
    own_ray = starts_its_own_ray()
    init_ray()
    with sigterm_as_ctrl_c():
        results = run_verb(run_pipeline, cfg)
    typer.echo(format_summary(results))
    if "serve" not in cfg.pipeline.stages:
        return
    if pipeline_waits(cfg, own_ray):
        typer.echo("serving until Ctrl-C (pipeline.wait=false returns at once)")
        wait_until_interrupted(cfg.serve.app_name)
    elif not own_ray:
        typer.echo(
            f"{cfg.serve.app_name} keeps serving on this cluster after this command ends "
            "(pipeline.wait=true keeps it up only while the command runs); `serve shutdown` "
            "stops every app there"
        )


def pipeline_waits(cfg: Config, own_ray: bool) -> bool:
    """Whether `soulray pipeline` stays up after deploying: pipeline.wait, or unset, on a Ray it
    started (whose app ends with it); a Ray job on a cluster that waited ran until stopped."""
    return cfg.pipeline.wait if cfg.pipeline.wait is not None else own_ray


@app.command(name="eval")
def eval_cmd(
    config: ConfigOpt,
    overrides: Overrides = None,
    fail_if_worse: Annotated[
        str | None,
        typer.Option(
            "--fail-if-worse",
            metavar="BASELINE",
            help="Exit 1 when eval.gate.candidate's eval.gate.metric is below this model's "
            "beyond the 95% CI, no item has a value for both, or the candidate failed or went "
            "unscored on over 10% of the items more than it (a promotion gate for RayJobs); a "
            "config the gate cannot use exits 2.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Reuse the phases an earlier run saved in eval.output_dir/phases/ (replies per "
            "model, judge, dialogues) where its settings and contexts were the same; run the "
            "rest, and ask again what an endpoint failed. Without it nothing is reused (the same "
            "URL may serve another model now).",
        ),
    ] = False,
) -> None:
    """Evaluate models behind OpenAI-compatible endpoints: reference metrics, judge, pairwise,
    Seeker-driven dialogues; writes report.json, report.md and PNG charts."""
    from soulray.eval.markdown import render_summary
    from soulray.eval.report import nothing_answered, nothing_judged
    from soulray.eval.run import check_config, run_eval

    setup_logging()
    cfg = load(config, overrides)
    # before Ray starts, and exit 2 (a config to fix), never 1 (the gate's "worse")
    run_verb(as_config_error(check_config), cfg.eval, fail_if_worse)
    init_ray()
    report = run_verb(run_eval, cfg, fail_if_worse, resume)
    typer.echo(render_summary(report, cfg.eval.output_dir))
    failure = nothing_answered(report) or nothing_judged(report)
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
    if failure is not None or report.get("gate", {}).get("worse"):
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[  # str, not Path: Path("s3://b/run") is s3:/b/run
        str,
        typer.Argument(
            help="A training run: the directory holding metrics.jsonl (local, s3://, gs://)."
        ),
    ],
) -> None:
    """A training run's metrics.jsonl as PNG curves (loss, val loss, tokens/s, lr) + report.md."""
    from soulray.eval.curves import write_training_report

    out = run_verb(write_training_report, run_dir)
    typer.echo(f"wrote {out}/report.md and its curves")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    command: Annotated[
        list[str], typer.Argument(help="The soulray command to run, after --.", show_default=False)
    ],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
            "else $RAY_ADDRESS, else a cluster started on this machine)."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the logs until the job ends.")] = True,
    upload: Annotated[
        bool,
        typer.Option(
            help="Upload this project as the job's working_dir (--no-upload: "
            "the cluster image already holds soulray)."
        ),
    ] = True,
    env: Annotated[
        list[str] | None,
        typer.Option(
            help="Pass this environment variable of your shell to the job (repeatable), e.g. "
            "--env JUDGE_API_KEY for an endpoint's api_key_env: the job runs on the cluster, "
            "where your exports are not. Its value is visible to whoever can read the job's "
            "runtime_env (the dashboard).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Submit a soulray verb as a Ray job: soulray submit --address URL -- soulray train -c X."""
    from soulray.submit import job_commands, submit_job

    job_id, status = run_verb(
        submit_job, address, command, wait, upload, Path.cwd(), tuple(env or ())
    )
    typer.echo(f"job {job_id}: {status}")
    if not wait:
        typer.echo(f"  follow it: {job_commands(job_id, address)}")
    if wait and status != "SUCCEEDED":
        raise typer.Exit(1)


def main() -> None:
    send_cluster_token()
    app()


if __name__ == "__main__":
    main()
