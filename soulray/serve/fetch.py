"""A local directory for an export that may live on s3://, gs:// or NFS.

- Atomic: files are streamed into a hidden temporary directory beside the cache, which is renamed
  into place only when every file is complete, so an interrupted download is never reused (a
  later fetch starts over; stale partial directories are removed).
- Keyed by content: the cache name hashes the URI and every file's path, size and modification
  time, so a re-export to the same URI is fetched again instead of serving the old model.
- Streamed: each file is copied in chunks, never read whole into memory.
- `weights=False` (the ingress) fetches only what tokenization needs: config, tokenizer,
  generation config and soulray's records, not the weights or adapter/ and base/.
- Only whole exports: one that `soulray train` is still writing (its INCOMPLETE_FILE is there,
  in it or, for adapter/ and base/, in the folder above) is refused like a missing one, and
  with `wait_s` (serve.wait_for_model_s) both are waited for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from soulray import storage
from soulray.config import INCOMPLETE_FILE

log = logging.getLogger("ray.serve.soulray")  # a child of Serve's logger: lands in replica logs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
WEIGHT_DIRS = ("adapter", "base")
CHUNK = 8 << 20
STALE_PARTIAL_S = 3600
POLL_S = 5.0  # how often a wait looks again
LOG_EVERY_S = 30.0  # and says that it still waits


def fetch_model_dir(path: str, weights: bool = True, wait_s: int = 0) -> str:
    """A local directory holding the export: the path itself, or a cached copy of a remote one;
    first waits up to `wait_s` for the export to be complete (wait_for_export)."""
    wait_for_export(path, wait_s)
    if not storage.is_remote(path):
        return storage.normalize(path)
    files = remote_files(path, weights)
    if not files:
        raise ValueError(f"model directory {path} is empty or does not exist; check the URI")
    if any(rel.rsplit("/", 1)[-1] == INCOMPLETE_FILE for rel, _, _ in files):
        raise ValueError(  # a re-export began between the wait and the listing
            f"model directory {path} is being written again (its {INCOMPLETE_FILE} appeared "
            "while it was read); serve it once soulray train has finished"
        )
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


def wait_for_export(path: str, wait_s: int) -> None:
    """Return once the export at `path` is there and complete. With wait_s > 0 look every
    POLL_S seconds for up to wait_s (logging at the start and every LOG_EVERY_S), else fail at
    once; the error says what is missing and how long it was waited for."""
    start = time.monotonic()
    next_log = 0.0
    while (problem := export_problem(path)) is not None:
        error, awaited = problem
        waited = time.monotonic() - start
        if waited >= wait_s:
            waits = f" (waited {waited:.0f} s for it: serve.wait_for_model_s={wait_s})"
            raise ValueError(error + (waits if wait_s else ""))
        if waited >= next_log:
            log.info(
                "waiting for the export at %s: %d s of %d (serve.wait_for_model_s; %s)",
                path,
                waited,
                wait_s,
                awaited,
            )
            next_log += LOG_EVERY_S
        time.sleep(min(POLL_S, wait_s - waited))
    if next_log:
        log.info("the export at %s is complete after %.0f s", path, time.monotonic() - start)


def export_problem(path: str) -> tuple[str, str] | None:
    """Why the export at `path` cannot be served yet, as (the error, what a wait waits for);
    None when it can be."""
    remote = storage.is_remote(path)
    where = storage.normalize(path)
    parent = where.rsplit("/", 1)[0] if remote else os.path.dirname(where)
    # an export's adapter/ or base/ is whole only when the export is: look in the folder above
    # for those alone (a model elsewhere may sit where its parent is not ours to read)
    above = where.rstrip("/").rsplit("/", 1)[-1] in WEIGHT_DIRS

    def marked() -> tuple[str, str] | None:
        for folder in [where, parent] if above else [where]:
            marker = storage.join(folder, INCOMPLETE_FILE)
            if storage.exists(marker):
                return (
                    f"model directory {where} is incomplete: soulray train is writing it, or died "
                    f"while writing it ({marker} is there until its last file is in); wait for "
                    "the training to finish or run it again",
                    f"soulray train is writing it: {marker} is there until its last file is in",
                )
        return None

    if (problem := marked()) is not None:
        return problem
    if remote and not remote_files(path, weights=True):
        return (
            f"model directory {where} is empty or does not exist; check the URI",
            "it has no files yet: soulray train writes them",
        )
    if not remote and not os.path.isdir(where):
        return (
            f"model directory {where} does not exist; run `soulray train` first or set "
            "serve.engine.model_dir to an export",
            "it does not exist yet: soulray train writes it",
        )
    if not remote and not os.listdir(where):  # made, its first file not yet in
        return (
            f"model directory {where} is empty; run `soulray train` first or set "
            "serve.engine.model_dir to an export",
            "it has no files yet: soulray train writes them",
        )
    # a writer that began after the first look has put its marker in, maybe as the only file
    # the listing found: look again
    return marked()


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
