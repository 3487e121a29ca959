"""The manifest of a prepared data directory: where it is, how it is read, and what it records
as the tokenizer's source. One home for what prepare writes and train, eval and the pipeline
read back."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from soulray import storage
from soulray.config import Config, DataConfig, config_hash

MANIFEST_FILE = "manifest.json"
TRAINED_TOKENIZER = "trained"  # the source of a tokenizer trained on the corpus by prepare


# everything prepare writes into data.output_dir (`_work` only while it runs)
OUTPUTS = ("train", "val", "_work", "tokenizer", MANIFEST_FILE, "rejects.jsonl", "config.yaml")


def prepare_outputs(data_dir: str) -> list[str]:
    """The paths prepare writes in `data_dir`: never read back as corpus when the output sits
    inside (or above) an input folder."""
    return [storage.join(data_dir, name) for name in OUTPUTS]


def manifest_path(data_dir: str) -> str:
    """Where prepare writes the manifest of `data_dir` (local path or s3:// gs:// URI)."""
    return storage.join(data_dir, MANIFEST_FILE)


def read_manifest(data_dir: str) -> dict[str, Any] | None:
    """The manifest of a prepared data directory; None when it has none (not prepare's output,
    or a prepare that did not finish)."""
    path = manifest_path(data_dir)
    if not storage.exists(path):
        return None
    manifest: dict[str, Any] = json.loads(storage.read_text(path))
    return manifest


# data.* settings that decide how prepare runs, not which rows it writes: a change of them alone
# (more render actors on a bigger cluster, the prepared folder moved) does not prepare again
RUN_ONLY_KEYS = ("num_workers", "output_dir")


def data_config_hash(data: DataConfig) -> str:
    """The manifest's `config_hash`: the data config less RUN_ONLY_KEYS."""
    return config_hash(data.model_copy(update={k: None for k in RUN_ONLY_KEYS}))


def same_data_config(manifest: dict[str, Any], data: DataConfig) -> bool:
    """Whether a manifest was prepared with this data config, but for RUN_ONLY_KEYS. A
    manifest from before stop 44 hashed the whole of data.* and is compared as it was made."""
    recorded = manifest.get("config_hash")
    return recorded in (data_config_hash(data), config_hash(data))


# what decides the prepared rows, in the manifest; the rest (timings, input paths) does not
ROW_KEYS = ("splits", "tokenizer", "config_hash", "seq_len", "mode", "partitions")


def data_fingerprint(data_dir: str) -> str | None:
    """A short hash of what decides a prepared directory's rows (per-split counts, tokenizer,
    data config): a checkpoint records it, so a resume on data prepared again into the same
    folder is noticed. None when the directory has no manifest (not prepare's output)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return None
    rows = json.dumps({k: manifest.get(k) for k in ROW_KEYS}, sort_keys=True)
    return hashlib.sha256(rows.encode()).hexdigest()[:16]


def data_tokenizer_hash(data_dir: str) -> str | None:
    """The hash of the tokenizer a prepared directory's token ids are of (its manifest's); None
    without a manifest."""
    manifest = read_manifest(data_dir)
    return None if manifest is None else manifest.get("tokenizer", {}).get("hash")


def tokenizer_source(cfg: Config) -> str:
    """What the manifest records as the tokenizer's source: the configured tokenizer's path,
    or TRAINED_TOKENIZER when prepare trains one on the corpus."""
    return cfg.model.tokenizer_path or TRAINED_TOKENIZER
