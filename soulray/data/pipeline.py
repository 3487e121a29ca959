"""`soulray prepare`: the Ray Data job that turns raw corpora into packed Parquet shards.

plan byte ranges of whole records (ranges.py) -> parse ranges: adapt, clean, hash, assign split
(tasks; kept rows to <out>/_work/parsed, one small stats row each to the driver)
-> dedupe + prefix collapse as a hash-bucketed aggregation of key rows (dedupe.py)
-> load or train the tokenizer (a configured one loads on a driver thread during the parse)
-> per range: kept rows less its drops
-> render + window + pack (actor pool, tokenizer loaded once per actor) -> Parquet per split
-> rejects.jsonl, manifest.json (counts, tokens, packing efficiency, hashes), resolved config.
The driver holds counts and range offsets, never the corpus.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from soulray import storage
from soulray.config import Config, DataConfig, config_to_yaml
from soulray.data.conversation import (
    Conversation,
    Message,
    RecordError,
    build_strategy_lookup,
    count_target_turns,
)
from soulray.data.formats import FILE_SUFFIXES
from soulray.data.manifest import (
    data_config_hash,
    manifest_path,
    prepare_outputs,
    tokenizer_source,
)
from soulray.data.pack import Rows, build_rows
from soulray.data.parse import (
    KeptLoader,
    ParseSettings,
    ParseSummary,
    parse_inputs,
    write_rejects,
)
from soulray.data.partition import PARTITIONS, compact_partitions, write_block_partitions
from soulray.data.render import (
    check_control_tokens,
    control_token_pattern,
    find_end_of_turn,
    layout_conversation,
    render_conversation,
    split_windows,
    template_system_prompt,
    tokenize_layouts,
)
from soulray.data.tokenizer import (
    load_tokenizer,
    load_tokenizer_from_files,
    tokenizer_files,
    tokenizer_hash,
    train_tokenizer,
)

log = logging.getLogger("soulray.prepare")

RENDER_QUEUE_BYTES = 512 << 20
RENDER_QUEUE_BYTES_PER_WORKER = 64 << 20  # ~8 blocks of 2,048 SoulChat-sized conversations
SCALAR_COLUMNS = ["num_tokens", "num_target_tokens", "num_sequences", "assistant_turns"]


class StrictModeError(ValueError):
    """Raised with --strict when a record is bad; names the first one's file and line.

    Raised on the driver, after parsing: raised inside a Ray task it would reach the CLI only as
    a RayTaskError (Ray does not carry the exception chain), i.e. a traceback, not one line.
    """


def strict_dedupe_error(rejected: dict[str, int]) -> str:
    """--strict's message when the only rejects came from the corpus-wide dedupe."""
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
    return (
        f"{counts} record(s): the same conversation as an earlier record; remove the copies, or "
        "run without --strict to skip them (rejects.jsonl then names each one and its original)"
    )


def count_render_rejects(
    shards: list[dict[str, Any]], summary: ParseSummary
) -> list[dict[str, Any]]:
    """Fold the counts of the records the render actors rejected into the summary; return, in
    shard order, each shard's rejects file and its first reject (what --strict says)."""
    found = []
    for shard in shards:
        r = json.loads(shard.pop("rejects"))
        if not r["count"]:
            continue
        summary.rejected.update(r["reasons"])
        summary.kept -= r["count"]
        summary.kept_by_split[shard["split"]] -= r["count"]
        summary.sums["turns"] -= r["turns"]
        summary.sums["target_turns"] -= r["target_turns"]
        found.append(r)
    return found


def render_rejects_path(out: str, split: str, name: str) -> str:
    """Where a render actor writes the rejects of one shard: in the work directory, so that no
    record's text travels to the driver (a template that refuses most records would have put
    most of the corpus there)."""
    return storage.join(out, "_work", "render_rejects", f"{split}-{name}.jsonl")


class RenderPacker:
    """Ray Data actor: renders, windows and packs a block of conversations and writes the rows.

    Each actor writes its own Parquet shard per split (named after the block's first conversation,
    so a retried block overwrites rather than duplicates) and its rejected records to the work
    directory, and returns one small stats row per shard. Writing here, instead of in a
    downstream Ray write stage, means the actor pool can use every CPU without starving another
    stage of the same job.
    """

    def __init__(self, files: dict[str, bytes], cfg: DataConfig, out: str, trust_code: bool):
        # One tokenizer thread per actor: the actors already fill the node's CPUs.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        self.tokenizer = load_tokenizer_from_files(files, trust_code)
        self.eot = find_end_of_turn(self.tokenizer)
        self.control_tokens = control_token_pattern(self.tokenizer)
        self.template_system = template_system_prompt(self.tokenizer)
        self.skeletons: dict[tuple[str, ...], str] = {}  # the template per role sequence
        self.cfg = cfg
        self.out = out

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = []
        # A block allocates millions of token ints in lists that form no reference cycles: the
        # cyclic collector would only rescan them (about 10 % of the block's time), so it pauses.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for name in ("train", "val"):
                part = batch.filter(pa.compute.equal(batch.column("split"), name))
                if part.num_rows:
                    stats.append(self.write_shard(name, part))
        finally:
            if was_enabled:
                gc.enable()
            release_freed_heap()
        return pa.Table.from_pylist(stats)

    def write_shard(self, split: str, part: pa.Table) -> dict[str, Any]:
        from jinja2.exceptions import TemplateError

        seqs: list = []
        rejects: list[dict[str, Any]] = []
        texts = part.column("conversation").to_pylist()
        convs = [Conversation.from_json(text) for text in texts]
        locations = part.column("location").to_pylist()

        def reject(i: int, reason: str, detail: str) -> None:
            rejects.append(
                {
                    "reason": reason,
                    "detail": detail,
                    "location": locations[i],
                    "record": texts[i],
                    "turns": len(convs[i].messages),
                    "target_turns": count_target_turns(convs[i].messages),
                }
            )

        tags = self.cfg.strategy_tags
        kept, layouts = [], []
        for i, conv in enumerate(convs):
            if self.template_system and conv.messages[0].role != "system":
                system = Message("system", self.template_system)  # in every window, as served
                conv = dataclasses.replace(conv, messages=[system, *conv.messages])
            try:
                check_control_tokens(conv, self.control_tokens)
                layouts.append(
                    layout_conversation(self.tokenizer, conv, self.eot, tags, self.skeletons)
                )
                kept.append(i)
            except TemplateError as e:  # e.g. "roles must alternate": this record, not the job
                reject(i, "template_error", f"the model's chat template refused it: {e}")
            except RecordError as e:
                reject(i, e.reason, e.detail)
        rendered = tokenize_layouts(self.tokenizer, layouts)
        without_prompt = 0
        for i, r in zip(kept, rendered, strict=True):
            try:
                windows, untrained = split_windows(r, self.cfg.seq_len)
            except RecordError as e:  # rejected like a bad record, not a failed job
                reject(i, e.reason, e.detail)
                continue
            seqs += windows
            without_prompt += untrained
        packed = self.cfg.mode == "packed"
        rows = build_rows(seqs, self.cfg.seq_len, self.tokenizer.pad_token_id, packed)
        name = f"part-{part.column('hash')[0].as_py()[:16]}"
        table = rows_to_table(rows, name)
        files = write_block_partitions(table, self.out, split, name)
        sums = {c: int(pa.compute.sum(table.column(c)).as_py() or 0) for c in SCALAR_COLUMNS}
        written = part.num_rows - len(rejects)
        return (
            {"split": split, "conversations": written, "rows": table.num_rows}
            | {"replies_without_room": without_prompt}
            | sums
            | {"files": files, "rejects": json.dumps(self.write_rejects(split, name, rejects))}
        )

    def write_rejects(self, split: str, name: str, rejects: list[dict[str, Any]]) -> dict[str, Any]:
        """A shard's rejects to their file (rejects.jsonl's lines); their counts for the driver."""
        if not rejects:
            return {"count": 0}
        path = render_rejects_path(self.out, split, name)
        keys = ("reason", "detail", "location", "record")
        lines = [json.dumps({k: r[k] for k in keys}, ensure_ascii=False) for r in rejects]
        storage.write_text(path, "".join(line + "\n" for line in lines))
        first = rejects[0]
        return {
            "count": len(rejects),
            "reasons": Counter(r["reason"] for r in rejects),
            "turns": sum(r["turns"] for r in rejects),
            "target_turns": sum(r["target_turns"] for r in rejects),
            "file": path,
            "first": f"{first['location']}: {first['reason']}: {first['detail']}",
        }


def release_freed_heap() -> None:
    """Hand the heap pages freed by a render block back to the OS. A block frees ~200 MiB of
    small token objects; glibc keeps such pages mapped (measured: one actor's RSS 800 -> 840 MiB
    over 30 blocks without this, 600 -> 615 MiB with it, at the same speed). No-op off glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


try:
    _LIBC: Any = ctypes.CDLL(None)
except OSError:  # no C library to ask (not expected on Linux or macOS)
    _LIBC = None


def row_keys(shard_name: str, n: int) -> list[int]:
    """Deterministic pseudo-random 52-bit keys: training assigns row -> rank by key % world.
    (52 bits: Arrow's modulo kernel works in float64, exact only below 2**53.)"""
    keys = []
    for i in range(n):
        digest = hashlib.blake2b(f"{shard_name}:{i}".encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 12)
    return keys


def rows_to_table(rows: Rows, shard_name: str) -> pa.Table:
    """Rows as a Parquet-ready table, ordered by row_key (a seeded shuffle of the shard)."""
    n_rows, seq_len = rows.input_ids.shape
    keys = np.array(row_keys(shard_name, n_rows), dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    # int64 arithmetic, then a checked cast: a shard past 2**31 tokens fails instead of wrapping
    offsets = pa.array(np.arange(n_rows + 1, dtype=np.int64) * seq_len, type=pa.int32())

    def lists(matrix: np.ndarray) -> pa.Array:  # list<int32> over one contiguous buffer
        return pa.ListArray.from_arrays(offsets, pa.array(matrix[order].reshape(-1)))

    return pa.table(
        {
            "row_key": pa.array(keys[order]),
            "input_ids": lists(rows.input_ids),
            "labels": lists(rows.labels),
            "position_ids": lists(rows.position_ids),
            "num_tokens": pa.array(rows.num_tokens[order]),
            "num_target_tokens": pa.array(rows.num_target_tokens[order]),
            "num_sequences": pa.array(rows.num_sequences[order]),
            "assistant_turns": pa.array(rows.assistant_turns[order]),
        }
    )


def load_run_tokenizer(cfg: Config, train_ds: Any = None) -> Any:
    """The configured tokenizer, or one trained on the corpus (`train_ds`, its train split);
    its chat template checked."""
    path = cfg.model.tokenizer_path
    if path:
        log.info("tokenizer: loading %s", path)
        try:
            tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
        except OSError as e:
            if Path(path).expanduser().exists():
                raise
            # from None: the CLI shows the first FileNotFoundError of a chain, which was the
            # hub's own words ("Cannot find the requested files in the disk cache")
            raise ValueError(not_a_model(cfg, path, e)) from None
    else:
        n = cfg.data.tokenizer_train_conversations
        log.info(
            "tokenizer: no model configured, training a %d-token BPE on up to %d conversations",
            cfg.data.tokenizer_vocab_size,
            n,
        )
        sample = train_ds.select_columns(["conversation"]).limit(n).take_all()
        texts = [
            "\n".join(m.content for m in Conversation.from_json(r["conversation"]).messages)
            for r in sample
        ]
        tokenizer = train_tokenizer(texts, cfg.data.tokenizer_vocab_size)
    check_template(tokenizer, cfg.data.system_prompt)
    return tokenizer


def save_run_tokenizer(tokenizer: Any, out_dir: str) -> dict[str, bytes]:
    """Save the tokenizer beside the data; its files, to send to the render actors."""
    with tempfile.TemporaryDirectory(prefix="soulray-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        files = tokenizer_files(local)
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, "tokenizer", name), data)
    return files


def check_template(tokenizer: Any, system_prompt: str | None = None) -> None:
    """Render one conversation on the driver, so a template soulray cannot use fails here with
    one clear message instead of in every render actor."""
    from jinja2.exceptions import TemplateError

    from soulray.data.conversation import Message

    eot = find_end_of_turn(tokenizer)
    turns = [Message("user", "u"), Message("assistant", "a")]
    try:
        render_conversation(tokenizer, Conversation("check", "soulray", None, turns), eot)
    except TemplateError as e:
        raise ValueError(
            f"the chat template refuses a plain user/assistant exchange: {e}"
        ) from None
    # A template without a system role (Gemma's) still works: conversations with a system
    # message are then rejected one by one (template_error); a system_prompt would put one in
    # every conversation, so it is refused by its key.
    with_system = [Message("system", "s"), *turns]
    try:
        render_conversation(tokenizer, Conversation("check", "soulray", None, with_system), eot)
    except TemplateError as e:
        if system_prompt:
            raise ValueError(
                f"data.system_prompt is set, but the model's chat template refuses system "
                f"messages ({e}); unset data.system_prompt for this model"
            ) from None
        log.warning(
            "warning: the chat template refuses system messages (%s): conversations that have "
            "one are rejected (template_error)",
            e,
        )
    default = None if system_prompt else template_system_prompt(tokenizer)
    if default:
        log.info(
            "the chat template writes its own system prompt into conversations without one "
            "(%r): every window of such a conversation opens with it, as serving sends it",
            default[:80],
        )


def split_stats(shards: list[dict[str, Any]], seq_len: int) -> dict[str, dict[str, Any]]:
    """Sum the per-shard stats the render actors returned, per split."""
    keys = [
        "conversations",
        "rows",
        "files",
        "replies_without_room",
        *SCALAR_COLUMNS,
    ]
    stats: dict[str, dict[str, Any]] = {name: dict.fromkeys(keys, 0) for name in ("train", "val")}
    for shard in shards:
        for key in keys:
            stats[shard["split"]][key] += shard[key]
    for s in stats.values():
        s["packing_efficiency"] = round(s["num_tokens"] / max(1, s["rows"] * seq_len), 4)
    return stats


def check_local_model_path(cfg: Config, weights: bool = False) -> None:
    """A model path that is not there, refused before any parsing (it used to fail after the
    whole corpus was read, as transformers' 'Repo id must be in the form ...'): the tokenizer's,
    and with `weights` (training) the model's too."""
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    paths = [(key, cfg.model.tokenizer_path)]
    if weights and cfg.model.tokenizer:
        paths.append(("model.name_or_path", cfg.model.name_or_path))
    for key, path in paths:
        if path is None or not path.startswith(("/", "./", "../", "~")):
            continue  # the tiny model, or a hub id
        if not Path(path).expanduser().exists():
            raise ValueError(
                f"{key} {path!r} does not exist; set it to a local Hugging Face model directory "
                "(or a hub id such as Qwen/Qwen2.5-7B-Instruct where the hub can be reached)"
            )


def not_a_model(cfg: Config, path: str, e: OSError) -> str:
    """A model path that is no local directory, and the hub gave nothing for it as an id
    (transformers' error named neither the key nor the local-path rule)."""
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"{key} {path!r} is no local directory, and the Hugging Face Hub gave nothing for it as "
        f"a model id ({first}). A local path starts with ./, ../, / or ~ (e.g. ./{path}); a "
        "hub id needs the hub reachable or the model in the local Hugging Face cache"
    )


def check_splits(kept_by_split: dict[str, int], val_fraction: float) -> None:
    """An empty train split is refused (nothing to train on); an empty val split is warned
    about (training then reports no validation loss)."""
    train, val = kept_by_split["train"], kept_by_split["val"]
    if train == 0:
        raise ValueError(
            f"the train split is empty: data.val_fraction={val_fraction} sent all {val} "
            "conversations to val; lower data.val_fraction"
        )
    if val == 0 and val_fraction > 0:
        log.warning(
            "warning: the val split is empty (data.val_fraction=%s of %d conversations drew "
            "none): training will report no validation loss; raise data.val_fraction or add "
            "conversations",
            val_fraction,
            train,
        )


def check_prepare(cfg: Config) -> list[str]:
    """What is wrong with prepare's settings that needs no Ray (`soulray prepare` checks it
    before starting Ray, which takes many seconds); returns the input files."""
    d = cfg.data
    out = storage.normalize(d.output_dir)
    if not d.inputs:
        raise ValueError("data.inputs is empty; set it, e.g. data.inputs='[corpus/*.jsonl]'")
    if storage.is_file(out):
        raise ValueError(f"data.output_dir {out} is a file; name a directory (it is created)")
    check_local_model_path(cfg)
    return storage.expand_inputs(d.inputs, FILE_SUFFIXES, exclude=prepare_outputs(out))


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Run the whole prepare job on the current Ray cluster; return the manifest."""
    import ray.data
    from ray.data import ExecutionResources

    d = cfg.data
    started = time.time()
    out = storage.normalize(d.output_dir)
    files = check_prepare(cfg)
    inputs = storage.input_files(files)  # as read: `soulray pipeline` compares them
    from soulray.train.launch import cluster_hosts, storage_problem

    problem = storage_problem(out, cluster_hosts(), "data.output_dir")
    if problem:  # refused before any work, not found out by `soulray train` afterwards
        raise ValueError(problem)
    log.info("reading %d file(s) into %s", len(files), out)
    empty = [f for f, (size, *_) in inputs.items() if size == 0]
    if empty:  # valid JSON Lines with no record: nothing to reject, but likely not meant
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        log.warning(
            "warning: %d input file(s) are empty (0 bytes), no record read: %s", len(empty), shown
        )
    settings = ParseSettings(
        format=d.format,
        lookup=build_strategy_lookup(d.strategies),
        fallback=d.strategies.fallback,
        system_prompt=d.system_prompt,
        val_fraction=d.val_fraction,
        seed=d.seed,
    )
    work = storage.join(out, "_work")  # parsed rows and decisions, deleted at the end
    created = not storage.exists(out)
    # the manifest marks a finished prepare: an earlier one's goes now, so that this run, if it
    # fails, leaves no output that `soulray train` would take for data prepared by this config
    storage.delete_file(manifest_path(out))
    # an earlier run's rejects too: a run refused later (--strict, an empty split) must not
    # leave them looking like its own
    storage.delete_file(storage.join(out, "rejects.jsonl"))
    storage.delete_dir(work)
    storage.makedirs(storage.join(work, "parsed"))
    with ThreadPoolExecutor(1) as pool:
        # A configured tokenizer loads (transformers import, a 129K vocabulary: seconds) on a
        # driver thread while the cluster parses, instead of after it with the CPUs idle.
        early = pool.submit(load_run_tokenizer, cfg) if cfg.model.tokenizer_path else None
        summary, rids = parse_inputs(files, settings, work, d.range_bytes)
        tokenizer = early.result() if early else None
    stages = {"read_parse_dedupe": time.time() - started}
    if d.strict and (summary.first_error or summary.rejected):
        storage.delete_dir(out if created else work)  # --strict writes nothing
        raise StrictModeError(summary.first_error or strict_dedupe_error(summary.rejected))
    log.info(
        "records: %d read, %d kept, %d collapsed into longer dialogues, rejected %s",
        summary.records,
        summary.kept,
        summary.collapsed,
        dict(summary.rejected) or "none",
    )
    rejects_path = storage.join(out, "rejects.jsonl")
    if summary.records == 0:  # nothing to reject either: rejects.jsonl would be empty
        storage.delete_dir(out if created else work)
        raise ValueError(
            f"data.inputs hold no record: the {len(files)} file(s) they name are empty; "
            "check data.inputs"
        )
    if summary.kept == 0:
        write_rejects(work, rejects_path, [])
        storage.delete_dir(work)  # the rejects hold every record; the parsed rows are no use
        raise ValueError(  # the first reason says most (a wrong data.format names the fix)
            f"no conversation survived cleaning ({summary.records} record(s) rejected: "
            f"{dict(summary.rejected)}); the first: {summary.first_error}; see {rejects_path} "
            "for each one"
        )
    try:
        check_splits(summary.kept_by_split, d.val_fraction)
    except ValueError:
        storage.delete_dir(work)  # every cleaned conversation, on disk a second time
        raise
    kept = ray.data.from_items(
        [{"rid": rid} for rid in rids], override_num_blocks=len(rids)
    ).map_batches(
        KeptLoader,
        fn_constructor_args=(work,),
        batch_size=1,
        batch_format="pyarrow",
        # 0 CPUs: scheduled beside the render actors, and its own operator (an actor pool is
        # never fused into the render actors, whose batch_size would bundle every range into ONE
        # actor task: no parallelism, no progress)
        num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=2),
    )
    if tokenizer is None:  # trained on the corpus: only now are its kept rows known
        tokenizer = load_run_tokenizer(cfg, kept.filter(expr="split == 'train'"))
    files_by_name = save_run_tokenizer(tokenizer, out)
    del tokenizer  # the actors load their own copy
    gc.collect()
    release_freed_heap()
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if not d.num_workers and cpus == 0:
        log.warning(
            "the cluster has no CPU yet (an autoscaling cluster with no worker up): rendering "
            "with 1 worker; set data.num_workers to the render actors it should start"
        )
    workers = d.num_workers or max(1, cpus)
    for name in ("train", "val"):
        storage.delete_dir(storage.join(out, name))
    log.info(
        "rendering and %s %d conversations (train %d, val %d) with %d worker(s)",
        d.mode,
        summary.kept,
        summary.kept_by_split["train"],
        summary.kept_by_split["val"],
        workers,
    )
    rendered = kept.map_batches(
        RenderPacker,
        batch_size=d.pack_block,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_args=(files_by_name, d, out, cfg.model.trust_remote_code),
    )
    # The loader is far cheaper than rendering, so Ray Data would queue loaded blocks until its
    # share of the node's object store is full: GiBs of resident shared memory that grow with the
    # store's size, not with what rendering needs. A few blocks per actor keep the actors fed.
    rendered.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=max(RENDER_QUEUE_BYTES, workers * RENDER_QUEUE_BYTES_PER_WORKER)
    )
    shards = rendered.take_all()
    stages["tokenizer_render_pack_write"] = time.time() - started - sum(stages.values())
    render_rejects = count_render_rejects(shards, summary)
    if d.strict and render_rejects:  # a record only rendering can judge (too long, template)
        if created:
            storage.delete_dir(out)
        else:  # rendering already replaced the old splits: leave no half-written output behind
            for name in ("train", "val", "_work"):
                storage.delete_dir(storage.join(out, name))
            log.warning("--strict: the earlier output in %s was removed (not prepared now)", out)
        raise StrictModeError(render_rejects[0]["first"])
    write_rejects(work, rejects_path, [r["file"] for r in render_rejects])
    storage.delete_dir(work)
    stats = split_stats(shards, d.seq_len)
    without_room = sum(s["replies_without_room"] for s in stats.values())
    if without_room:
        log.warning(
            "warning: %d assistant repl(ies) were not trained: with the message before them "
            "they do not fit in data.seq_len=%d (a reply is never trained without what it "
            "answers); raise data.seq_len to train them (replies_without_room in the manifest)",
            without_room,
            d.seq_len,
        )
    if stats["train"]["rows"] == 0:  # every train conversation rejected or without room
        raise ValueError(
            "no train row was written: each train reply had no room beside its prompt in "
            f"data.seq_len={d.seq_len} ({without_room} in all) or its conversation was rejected "
            f"(see {rejects_path}); raise data.seq_len"
        )
    # staged block files -> one file group per partition
    for name, n_files in compact_partitions(out, ["train", "val"], d.seq_len).items():
        stats[name]["files"] = n_files
    manifest = build_manifest(cfg, files, summary, stats, files_by_name, time.time() - started)
    manifest["stage_seconds"] = {k: round(v, 2) for k, v in stages.items()}
    manifest["inputs_fingerprint"] = storage.files_fingerprint(inputs)
    manifest["inputs_files"] = inputs  # sizes, times, hashes: a re-run reads only what changed
    storage.write_text(manifest_path(out), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.write_text(storage.join(out, "config.yaml"), config_to_yaml(cfg))
    return manifest


def build_manifest(
    cfg: Config,
    files: list[str],
    summary: ParseSummary,
    stats: dict[str, dict[str, Any]],
    tokenizer: dict[str, bytes],
    seconds: float,
) -> dict[str, Any]:
    total = {
        k: sum(s[k] for s in stats.values())
        for k in [*SCALAR_COLUMNS, "rows", "replies_without_room"]
    }
    if total["assistant_turns"] + total["replies_without_room"] != summary.sums["target_turns"]:
        raise AssertionError(
            f"rendered {total['assistant_turns']} assistant turns (and left "
            f"{total['replies_without_room']} without room) but the kept conversations have "
            f"{summary.sums['target_turns']}: a window lost or repeated a target"
        )
    seq_len = cfg.data.seq_len
    return {
        "conversations": summary.kept,
        "records": summary.records,
        "collapsed_prefixes": summary.collapsed,
        "rejected": dict(sorted(summary.rejected.items())),
        "turns": summary.sums["turns"],
        "assistant_turns": summary.sums["target_turns"],
        "merged_turns": summary.sums["merged_turns"],
        # merged replies whose second strategy label gave way to the first's
        "merged_strategies_dropped": summary.sums["strategies_dropped"],
        "empty_turns_dropped": summary.sums["empty_turns"],
        "unknown_strategies": dict(summary.unknown_strategies.most_common()),
        "tokens": total["num_tokens"],
        "target_tokens": total["num_target_tokens"],
        "sequences": total["num_sequences"],
        # replies not trained: they do not fit in seq_len beside the message they answer
        "replies_without_room": total["replies_without_room"],
        "rows": total["rows"],
        "packing_efficiency": round(total["num_tokens"] / max(1, total["rows"] * seq_len), 4),
        "seq_len": seq_len,
        "partitions": PARTITIONS,  # rows in <split>/part=<row_key % partitions>/
        "mode": cfg.data.mode,
        "strategy_tags": cfg.data.strategy_tags,
        "splits": stats,
        "tokenizer": {
            "source": tokenizer_source(cfg),
            "hash": tokenizer_hash(tokenizer),
        },
        "config_hash": data_config_hash(cfg.data),
        "inputs": cfg.data.inputs,
        # the same, absolute: a reader started elsewhere (eval's prepared contexts) finds them
        "inputs_resolved": [storage.normalize(i) for i in cfg.data.inputs],
        "files": len(files),
        "seconds": round(seconds, 2),
    }
