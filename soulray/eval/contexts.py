"""Held-out contexts: every m-turn dialogue gives m contexts (the history up to each counselor
turn) with that turn as the reference, as SoulChat and CPsyCounE evaluate.

Dialogues are read with the prepare stage's own record parsing and cleaning (formats, strategy
normalisation, the system prompt), on Ray Data. A prepared run's `val` split is not stored as
text (its Parquet holds packed token rows), so it is recomputed: the run's saved config.yaml
names its inputs and settings, and the split is a pure function of each conversation's content
hash, so the same conversations come out as prepare held out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from soulray import storage
from soulray.config import DataConfig, parse_config
from soulray.data.conversation import Conversation, build_strategy_lookup
from soulray.data.formats import FILE_SUFFIXES
from soulray.data.manifest import prepare_outputs, read_manifest
from soulray.data.parse import ParseSettings, normalize_record
from soulray.data.ranges import Range, plan_ranges, range_records
from soulray.eval.config import ContextsConfig
from soulray.text import Language, detect_language

log = logging.getLogger("soulray.eval")


@dataclass
class Context:
    id: str  # "<conversation id>#<index of the reference message>"
    conversation: str
    turn: int  # the reference's index in the conversation's messages
    language: Language
    # the history the models answer (system, user, assistant...); an assistant message with
    # a strategy holds it as "strategy", sent only to endpoints with send_strategies
    messages: list[dict[str, str]]
    reference: str  # the counselor's reply
    reference_strategy: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def prepared_data_config(prepared_dir: str) -> DataConfig:
    """The data section a prepared run was made with (its config.yaml)."""
    manifest = read_manifest(prepared_dir)
    config = storage.join(prepared_dir, "config.yaml")
    if manifest is None or not storage.exists(config):
        raise ValueError(
            f"eval.contexts.prepared_dir {prepared_dir} is not a `soulray prepare` output "
            "(manifest.json and config.yaml missing); run prepare first or use source: files"
        )
    data = parse_config(storage.read_text(config), config).data
    resolved = manifest.get("inputs_resolved")
    if resolved and all_found(resolved):  # config.yaml keeps them as given: relative to where
        data = data.model_copy(update={"inputs": resolved})  # prepare ran, these absolute
    if data.val_fraction == 0:
        raise ValueError(
            f"{prepared_dir} was prepared with data.val_fraction=0 and holds no val split; "
            "re-run prepare with a val_fraction, or use eval.contexts.source: files"
        )
    return data


def all_found(inputs: list[str]) -> bool:
    """Whether every entry still names files here (a prepare on another host, or in a Ray
    job's temporary copy of the project, leaves absolute paths that do not)."""
    try:
        storage.expand_inputs(inputs, FILE_SUFFIXES)
    except ValueError:
        return False
    return True


def read_conversations(
    inputs: list[str], data: DataConfig, split: str | None, key: str = "eval.contexts.inputs"
) -> list[Conversation]:
    """Cleaned, deduplicated conversations of `inputs` (only `split` when given), in file
    order, read as prepare reads them: the same byte ranges of whole records and the same
    `normalize_record`, in Ray tasks."""
    import ray.data

    files = storage.expand_inputs(inputs, FILE_SUFFIXES, key)
    settings = ParseSettings(
        format=data.format,
        lookup=build_strategy_lookup(data.strategies),
        fallback=data.strategies.fallback,
        system_prompt=data.system_prompt,
        val_fraction=data.val_fraction,
        seed=data.seed,
    )
    ranges = plan_ranges(files, data.range_bytes)
    items = [{"spec": json.dumps(asdict(r))} for r in ranges]
    rows = (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        .flat_map(functools.partial(_range_rows, settings=settings, split=split))
        .take_all()
    )
    rows.sort(key=lambda r: (r["rid"], r["index"]))
    rejected = [r for r in rows if r["reason"]]  # what prepare would put in rejects.jsonl
    if rejected:
        reasons = dict(Counter(r["reason"] for r in rejected))
        log.warning(
            "%s: %d record(s) skipped, as prepare rejects them %s; the first: %s",
            key,
            len(rejected),
            json.dumps(reasons),
            rejected[0]["why"],
        )
    rows = [r for r in rows if not r["reason"]]
    # A per-turn-expanded corpus holds each dialogue once per reply, as the dialogue so far:
    # like prepare, keep the longest (a sample whose hash is a prefix of another is dropped),
    # or its early replies would be scored once per later sample.
    longer = {h for r in rows for h in r["prefixes"]}
    seen: set[str] = set()
    out = []
    for r in rows:  # the first copy of a duplicate wins, as in prepare
        if r["hash"] not in seen and r["hash"] not in longer:
            seen.add(r["hash"])
            out.append(Conversation.from_json(r["conv"]))
    return out


def _range_rows(
    item: dict[str, Any], settings: ParseSettings, split: str | None
) -> list[dict[str, Any]]:
    """The kept conversations of one range (of `split` when given), with their position, and
    its rejected records (with a `reason`, and `why`: where and what)."""
    r = Range(**json.loads(item["spec"]))
    rows = []
    for index, raw in enumerate(range_records(r)):
        row = normalize_record(raw, settings)
        why = f"{row['location']}: {row['reason']}: {row['detail']}" if not row["ok"] else ""
        if not row["ok"] or split is None or row["split"] == split:
            rows.append(
                {"rid": r.rid, "index": index, "hash": row["hash"], "conv": row["conversation"]}
                | {"prefixes": row["prefixes"], "reason": row["reason"], "why": why}
            )
    return rows


def source_files(cfg: ContextsConfig) -> list[str]:
    """The source's files: a bad prepared_dir or input path fails here (eval checks it before
    Ray starts), with the key it came from."""
    if cfg.source == "prepared":
        assert cfg.prepared_dir is not None
        data = prepared_data_config(cfg.prepared_dir)
        # as prepare read them: its own output (prepared_dir), if inside an input, is not corpus
        own = prepare_outputs(cfg.prepared_dir)
        return storage.expand_inputs(data.inputs, FILE_SUFFIXES, PREPARED_INPUTS, own)
    return storage.expand_inputs(cfg.inputs, FILE_SUFFIXES, "eval.contexts.inputs")


PREPARED_INPUTS = "the prepared run's data.inputs"


def load_conversations(cfg: ContextsConfig) -> list[Conversation]:
    if cfg.source == "prepared":
        assert cfg.prepared_dir is not None
        data = prepared_data_config(cfg.prepared_dir)
        convs = read_conversations(data.inputs, data, "val", PREPARED_INPUTS)
        if not convs:
            raise ValueError(
                f"no conversation found in the val split of {cfg.prepared_dir} (prepared with "
                f"data.val_fraction={data.val_fraction}); prepare again with a larger "
                "data.val_fraction, or evaluate on files: eval.contexts.source=files and "
                "eval.contexts.inputs=[...]"
            )
        return convs
    convs = read_conversations(cfg.inputs, DataConfig(format=cfg.format), None)
    if not convs:
        raise ValueError(
            f"no conversation found in {cfg.inputs}; give files of a corpus format prepare "
            "reads (eval.contexts.inputs)"
        )
    return convs


def conversation_contexts(
    conv: Conversation, language: Language | Literal["auto"]
) -> list[Context]:
    """One context per assistant turn that follows a user turn."""
    out = []
    messages = [
        {"role": m.role, "content": m.content} | ({"strategy": m.strategy} if m.strategy else {})
        for m in conv.messages
    ]
    for i, m in enumerate(conv.messages):
        if m.role != "assistant" or not any(p.role == "user" for p in conv.messages[:i]):
            continue
        # the reply with what it answers: a short Latin reply ("OK", "👍") in a Chinese
        # conversation was taken for English, and its metrics split Chinese text into words
        said = " ".join(x.content for x in conv.messages[max(0, i - 1) : i + 1])
        lang = detect_language(said) if language == "auto" else language
        out.append(Context(f"{conv.id}#{i}", conv.id, i, lang, messages[:i], m.content, m.strategy))
    return out


def sent_history(messages: list[dict[str, str]], strategies: bool) -> list[dict[str, str]]:
    """The history as a model is sent it: the earlier replies' strategies only to an endpoint
    with send_strategies (soulray serve reads them; other servers may refuse the field)."""
    return [m if strategies else {"role": m["role"], "content": m["content"]} for m in messages]


def sample_contexts(cfg: ContextsConfig) -> list[Context]:
    """`cfg.n` contexts drawn with `cfg.seed` from every context of the source, kept in
    source order (the same config gives the same contexts)."""
    convs = load_conversations(cfg)
    every = unique_ids([c for conv in convs for c in conversation_contexts(conv, cfg.language)])
    if len(every) <= cfg.n:
        return every
    picked = sorted(random.Random(cfg.seed).sample(range(len(every)), cfg.n))
    return [every[i] for i in picked]


def unique_ids(contexts: list[Context]) -> list[Context]:
    """Contexts of two conversations that share an id (two files, each with an "id": "c1", or
    two data.jsonl in different folders) get "~2", "~3"... after the later ones' ids: the report
    and the gate pair models' replies by context id, and one would hide the other."""
    seen: dict[str, int] = {}
    out = []
    for c in contexts:
        seen[c.id] = seen.get(c.id, 0) + 1
        out.append(c if seen[c.id] == 1 else replace(c, id=f"{c.id}~{seen[c.id]}"))
    return out


def contexts_digest(contexts: list[Context]) -> str:
    """A short fingerprint of the contexts (same digest = same evaluation set)."""
    ids = json.dumps([c.id for c in contexts]).encode()
    return hashlib.blake2b(ids, digest_size=8).hexdigest()
