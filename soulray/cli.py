"""The `soulray` command line: one verb per stage, all configured by YAML plus `a.b=value` overrides."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from soulray.config import Config, ConfigError, load_config

app = typer.Typer(
    help="Train and serve empathetic-support language models on Ray.\n\n"
    "Every verb takes --config FILE.yaml and any number of dotted overrides, "
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
    """Join the Ray cluster in RAY_ADDRESS (a submitted job), or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, log_to_driver=True)


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
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return exc if type(exc) is ValueError else None


def run_verb(fn: Any, *args: Any) -> Any:
    """Run a stage; a user error prints one clear line and exits non-zero (no traceback)."""
    try:
        return fn(*args)
    except Exception as exc:
        found = user_error(exc)
        if found is None:
            raise
        typer.echo(f"error: {found}", err=True)
        raise typer.Exit(2 if isinstance(found, ConfigError) else 1) from None


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
    from soulray.data.pipeline import run_prepare

    setup_logging()
    cfg = load(config, [*(overrides or []), *(["data.strict=true"] if strict else [])])
    init_ray()
    manifest = run_verb(run_prepare, cfg)
    print_prepare_summary(manifest, cfg)


def print_prepare_summary(m: dict[str, Any], cfg: Config) -> None:
    rejected = sum(m["rejected"].values())
    typer.echo(
        f"prepared {m['conversations']} conversations ({rejected} rejected: "
        f"{json.dumps(m['rejected'], ensure_ascii=False)}), {m['assistant_turns']} assistant turns, "
        f"{m['tokens']} tokens ({m['target_tokens']} targets) in {m['rows']} rows of "
        f"{m['seq_len']}, packing efficiency {m['packing_efficiency']:.2%}\n"
        f"  output: {cfg.data.output_dir} (manifest.json, rejects.jsonl, train/, val/, tokenizer/)"
    )


@app.command()
def train(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Fine-tune on the prepared data with Ray Train (FSDP2; full or LoRA) and export the model."""
    from soulray.train.launch import run_train

    setup_logging()
    cfg = load(config, overrides)
    init_ray()
    result = run_verb(run_train, cfg)
    print_train_summary(result, cfg)


def print_train_summary(result: Any, cfg: Config) -> None:
    if result.error is not None:
        typer.echo(f"error: training failed: {result.error}", err=True)
        raise typer.Exit(1)
    m = result.metrics or {}
    val = f", val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
    typer.echo(
        f"trained {cfg.train.run_name} to step {m.get('step')}: loss {m.get('loss', float('nan')):.4f}"
        f"{val}, {m.get('tokens_per_s', 0):.0f} tokens/s\n"
        f"  checkpoints: {cfg.train.storage_path}/{cfg.train.run_name}\n"
        f"  model: {cfg.train.export_dir} (load with AutoModelForCausalLM.from_pretrained)"
    )


@app.command()
def quickstart(config: ConfigOpt, overrides: Overrides = None) -> None:
    """Run the whole pipeline tiny on local Ray: prepare -> train -> export -> serve -> chat."""
    from soulray.data.pipeline import run_prepare

    setup_logging()
    cfg = load(config, overrides)
    init_ray()
    log.info("quickstart 1/1: prepare")
    manifest = run_verb(run_prepare, cfg)
    print_prepare_summary(manifest, cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
