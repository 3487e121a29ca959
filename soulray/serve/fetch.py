"""A local directory for an export that may live on s3://, gs:// or NFS.

- Atomic: files are streamed into a hidden temporary directory beside the cache, which is renamed
  into place only when every file is complete, so an interrupted download is never reused (a
  later fetch starts over; stale partial directories are removed).
- Keyed by content: the cache name hashes the URI and every file's path, size and modification
  time, so a re-export to the same URI is fetched again instead of serving the old model.
- Streamed: each file is copied in chunks, never read whole into memory.
- `weights=False` (the ingress) fetches only what tokenization needs: config, tokenizer,
  generation config and soulray's records, not the weights or adapter/ and base/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from soulray import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
WEIGHT_DIRS = ("adapter", "base")
CHUNK = 8 << 20
STALE_PARTIAL_S = 3600


def fetch_model_dir(path: str, weights: bool = True) -> str:
    """A local directory holding the export: the path itself, or a cached copy of a remote one."""
    if not storage.is_remote(path):
        local = storage.normalize(path)
        if not os.path.isdir(local):
            raise ValueError(
                f"model directory {local} does not exist; run `soulray train` first or set "
                "serve.engine.model_dir to an export"
            )
        return local
    files = remote_files(path, weights)
    if not files:
        raise ValueError(f"model directory {path} is empty or does not exist; check the URI")
    root = cache_root()
    final = root / content_key(path, files, weights)
    if final.is_dir():
        return str(final)
    clean_partials(root)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        for rel, _, _ in files:
            copy_file(storage.join(path, rel), partial / rel)
        try:
            os.rename(partial, final)
        except OSError:  # another replica on this node finished the same fetch first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(final)


def cache_root() -> Path:
    root = Path(tempfile.gettempdir()) / "soulray-models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def remote_files(path: str, weights: bool) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file to fetch, sorted."""
    fs, inner = storage.resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(inner) :].lstrip("/")
        if not weights and (rel.endswith(WEIGHT_SUFFIXES) or rel.split("/")[0] in WEIGHT_DIRS):
            continue
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        out.append((rel, int(info.size or 0), int(mtime)))
    return sorted(out)


def content_key(path: str, files: list[tuple[str, int, int]], weights: bool) -> str:
    digest = hashlib.sha256(repr((path, weights, files)).encode()).hexdigest()[:20]
    return digest if weights else f"{digest}-meta"


def copy_file(source: str, target: Path) -> None:
    """Stream one remote file to a local path, CHUNK bytes at a time."""
    fs, inner = storage.resolve(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(inner) as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


def clean_partials(root: Path) -> None:
    """Remove partial downloads left by a process that died mid-fetch."""
    cutoff = time.time() - STALE_PARTIAL_S
    for partial in root.glob(".partial-*"):
        if partial.stat().st_mtime < cutoff:
            shutil.rmtree(partial, ignore_errors=True)
