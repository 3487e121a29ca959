"""`soulray pipeline`: prepare -> train (+ export) -> serve as one driver on the current Ray.

With `pipeline.run_dir` set, every stage writes under it (data/, checkpoints/, model/), locally
or in object storage. A stage whose output already exists for the same config is skipped, and
training resumes from its latest checkpoint, so re-running after a failure (a killed driver,
a lost node) continues where the run stopped instead of starting over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from soulray import storage
from soulray.config import (
    CONFIG_FILE,
    INCOMPLETE_FILE,
    METRICS_FILE,
    Config,
    parse_config,
)
from soulray.data.manifest import (
    TRAINED_TOKENIZER,
    read_manifest,
    same_data_config,
    tokenizer_source,
)

log = logging.getLogger("soulray.pipeline")


@dataclass
class StageResult:
    name: str
    status: str  # "ran" or "skipped"
    seconds: float
    summary: str


def with_run_dir(cfg: Config) -> Config:
    """Put every stage's output under pipeline.run_dir (when set)."""
    root = cfg.pipeline.run_dir
    if not root:
        return cfg
    data = cfg.data.model_copy(update={"output_dir": storage.join(root, "data")})
    train = cfg.train.model_copy(
        update={
            "data_dir": None,
            "storage_path": storage.join(root, "checkpoints"),
            "export_dir": storage.join(root, "model"),
        }
    )
    engine = cfg.serve.engine.model_copy(update={"model_dir": None})
    serve = cfg.serve.model_copy(update={"engine": engine})
    return cfg.model_copy(update={"data": data, "train": train, "serve": serve})


def prepared_manifest(cfg: Config) -> dict[str, Any] | None:
    """The manifest of a finished prepare with this data config (and tokenizer) of the input
    files as they are now, else None."""
    manifest = read_manifest(cfg.data.output_dir)
    if manifest is None:
        return None
    same_data = same_data_config(manifest, cfg.data)
    same_tokenizer = manifest.get("tokenizer", {}).get("source") == tokenizer_source(cfg)
    if not (same_data and same_tokenizer):
        return None
    return manifest if same_inputs(cfg, manifest) else None


def same_inputs(cfg: Config, manifest: dict[str, Any]) -> bool:
    """Whether data.inputs are the files the manifest's prepare read, unchanged (a record
    fixed or a file added since was left out of the data, silently). Inputs that are gone
    leave the prepared data in use: preparing again could only fail; so does a manifest
    written before prepare recorded its inputs (nothing to compare them with)."""
    from soulray.data.pipeline import check_prepare

    if "inputs_fingerprint" not in manifest:
        log.info("prepare: %s does not record its inputs; using it", cfg.data.output_dir)
        return True
    recorded = str(manifest["inputs_fingerprint"])
    try:
        files = check_prepare(cfg)
        if recorded.startswith("c:"):
            now = storage.files_fingerprint(
                storage.input_files(files, manifest.get("inputs_files"))
            )
        else:  # an older prepare's: paths, sizes and times
            now = storage.stat_fingerprint(files)
    except (ValueError, OSError) as e:
        log.warning("prepare: using the data in %s; its inputs: %s", cfg.data.output_dir, e)
        return True
    if recorded == now:
        return True
    log.info("prepare: data.inputs changed since %s was prepared", cfg.data.output_dir)
    return False


def trained_metrics(cfg: Config) -> dict[str, Any] | None:
    """The final metrics of an export made by this very training config, else None."""
    from soulray.train.launch import resolve_paths

    export = cfg.train.export_dir
    config_path, metrics_path = (storage.join(export, f) for f in (CONFIG_FILE, METRICS_FILE))
    if not (storage.exists(config_path) and storage.exists(metrics_path)):
        return None
    if storage.exists(storage.join(export, INCOMPLETE_FILE)):  # training died writing it
        return None
    from soulray.train.launch import with_kept

    exported = parse_config(storage.read_text(config_path), config_path)
    # a resume keeps lr, weight decay and betas from its checkpoint and records those in the
    # export: a config asking for others made this same export (training warned of it)
    wanted = with_kept(resolve_paths(cfg), exported)
    sections = ("data", "model", "lora", "train")
    if any(getattr(exported, s) != getattr(wanted, s) for s in sections):
        return None
    metrics = json.loads(storage.read_text(metrics_path))
    return metrics if metrics.get("step") == cfg.train.steps else None


def refuse_a_new_corpus_tokenizer(cfg: Config) -> None:
    """Prepare about to run again over data whose tokenizer it trained on the corpus, for a
    run with checkpoints: it would train another tokenizer (most ids move), which the run's
    checkpoints cannot resume on; refused before the data is replaced."""
    from soulray.train.launch import resolve_paths, saved_run_config

    if tokenizer_source(cfg) != TRAINED_TOKENIZER or read_manifest(cfg.data.output_dir) is None:
        return
    if saved_run_config(resolve_paths(cfg), quiet=True) is None:
        return
    raise ValueError(
        f"train.run_name={cfg.train.run_name} has checkpoints trained on the tokenizer prepare "
        f"trained on the corpus in {cfg.data.output_dir}; data.inputs or data.* changed, so "
        "prepare would train another one, whose token ids the checkpoints cannot resume on. Set "
        "a new train.run_name to train on the new data, or put data.inputs and data.* back"
    )


def refuse_finished_on_other_data(cfg: Config) -> None:
    """A run that finished training on data prepared again since (data.inputs or data.*
    changed, so prepare ran) is refused: its export would be skipped as this config's, or made
    again from the same checkpoint, a model of data that is gone, without a word."""
    from soulray.train.launch import (
        latest_checkpoint_step,
        prepared_again,
        resolve_paths,
        saved_run_config,
    )

    resolved = resolve_paths(cfg)
    saved = saved_run_config(resolved, quiet=True)
    if saved is None or latest_checkpoint_step(resolved) < cfg.train.steps:
        return  # nothing, or a run that goes on: training warns of the data it resumes on
    data = storage.normalize(resolved.train_data_dir)
    if prepared_again(saved[1], data):
        raise ValueError(
            f"train.run_name={cfg.train.run_name} finished training ({cfg.train.steps} steps) "
            f"on data that {data} no longer holds: it was prepared again since (data.inputs or "
            "data.* changed), and its model is of the old data. Set a new train.run_name to "
            "train on the new data, or put the inputs back"
        )


def timed(name: str, run: Callable[[], str], skip: str | None) -> StageResult:
    if skip is not None:
        log.info("%s: skipped, %s", name, skip)
        return StageResult(name, "skipped", 0.0, skip)
    log.info("%s: starting", name)
    start = time.time()
    summary = run()
    return StageResult(name, "ran", time.time() - start, summary)


def run_prepare_stage(cfg: Config) -> str:
    from soulray.data.pipeline import run_prepare

    m = run_prepare(cfg)
    return (
        f"{m['conversations']} conversations, {m['rows']} rows, "
        f"packing {m['packing_efficiency']:.1%} -> {cfg.data.output_dir}"
    )


def run_train_stage(cfg: Config) -> str:
    from soulray.train.launch import latest_checkpoint_step, run_train

    finished = latest_checkpoint_step(cfg) == cfg.train.steps  # started again: only exports
    result = run_train(cfg)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    m = result.metrics or {}
    nothing = "nothing to train (the run was already there), exported again, " if finished else ""
    return (
        f"step {m.get('step')}, {nothing}loss {m.get('loss', float('nan')):.4f} -> "
        f"{cfg.train.export_dir}"
    )


def run_serve_stage(cfg: Config) -> str:
    from soulray.serve.app import start_serving

    url = start_serving(cfg)
    return f"{cfg.serve.model_name} at {url}/v1"


def check_serve_stage(cfg: Config) -> None:
    """What the serve stage would refuse, before prepare and train run: serve.safety (a locale
    with no help line for a category, say) and a serve.port held by another program."""
    from soulray.safety.screen import build_screen
    from soulray.serve.app import check_serve_port

    build_screen(cfg.serve.safety)
    check_serve_port(cfg)


def run_pipeline(cfg: Config) -> list[StageResult]:
    """Run the configured stages in order; return what each did."""
    cfg = with_run_dir(cfg)
    stages = cfg.pipeline.stages
    if "serve" in stages:
        check_serve_stage(cfg)
    results = []
    if "prepare" in stages:
        manifest = prepared_manifest(cfg)
        skip = f"{cfg.data.output_dir} holds this data config's output" if manifest else None
        if skip is None and "train" in stages:  # train's refusal, before the data is replaced
            from soulray.train.launch import refuse_resume_changes, resolve_paths

            refuse_resume_changes(resolve_paths(cfg))
            refuse_a_new_corpus_tokenizer(cfg)
        results.append(timed("prepare", lambda: run_prepare_stage(cfg), skip))
    if "train" in stages:
        refuse_finished_on_other_data(cfg)
        metrics = trained_metrics(cfg)
        skip = (
            f"{cfg.train.export_dir} holds this config's model (step {metrics['step']})"
            if metrics
            else None
        )
        results.append(timed("train", lambda: run_train_stage(cfg), skip))
    if "serve" in stages:
        results.append(timed("serve", lambda: run_serve_stage(cfg), None))
    return results


def format_summary(results: list[StageResult]) -> str:
    lines = ["pipeline summary:"]
    for r in results:
        lines.append(f"  {r.name:<8} {r.status:<8} {r.seconds:7.1f}s  {r.summary}")
    return "\n".join(lines)
