"""Paths that may be local, on NFS, or in object storage (s3://, gs://), through pyarrow.fs.

Every stage reads and writes through these helpers, so a run directory can be a local folder on a
laptop or a bucket shared by a cluster without any other change.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger("soulray.storage")

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
GLOB_CHARS = "*?["


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def normalize(path: str) -> str:
    """Absolute local path (so Ray workers with another cwd agree), or the URI unchanged."""
    if is_remote(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return os.path.abspath(os.path.expanduser(path))


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it."""
    path = normalize(path)
    if not is_remote(path):
        return pafs.LocalFileSystem(), path
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. A reader never sees it half written: a local file is written beside
    itself under a hidden name and renamed over (a file rewritten while it is followed, like
    metrics.jsonl, or a worker killed mid-write, leaves the old content or the new); an object
    store's put is already all or nothing."""
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_remote(path):
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    directory, name = os.path.split(inner)
    temp = os.path.join(directory, f".{name}.{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, inner)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def delete_file(path: str) -> None:
    """Remove a file if it is there."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def delete_dir(path: str) -> None:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def clear_dir(path: str, keep: str) -> None:
    """Remove everything in a directory except its entry named `keep`."""
    fs, inner = resolve(path)
    for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        if info.base_name == keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


def list_files(path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under a directory (recursive), sorted; hidden files and folders are skipped."""
    return sorted(f for f, rel in _all_files(path) if _listed(f, rel, suffixes))


def _listed(file: str, rel: str, suffixes: tuple[str, ...]) -> bool:
    """list_files' rule: not hidden (no part of `rel` starts with '.' or '_'), of a suffix."""
    hidden = any(p.startswith((".", "_")) for p in rel.split("/"))
    return not hidden and (not suffixes or file.lower().endswith(suffixes))


def expand_inputs(
    inputs: list[str],
    suffixes: tuple[str, ...],
    key: str = "data.inputs",
    exclude: Sequence[str] = (),
) -> list[str]:
    """Files, globs and directories (local or remote) -> the sorted, de-duplicated file list;
    `key` names the setting they came from in the error for an entry that matches nothing.
    Directories and globs leave out the files at or under an `exclude` path (what prepare
    wrote there earlier); a file named as is is always read."""
    files: list[str] = []
    left_out: list[str] = []
    for item in inputs:
        try:
            found, own = _expand_one(item, suffixes, [normalize(p).rstrip("/") for p in exclude])
        except OSError as e:
            if not is_remote(item):
                raise
            raise ValueError(  # pyarrow's error, without a traceback through the listing
                f"{key} entry {item!r} cannot be listed: {e}. Check the bucket's name, that "
                "this machine reaches the object store, and its credentials (for s3: "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_REGION)"
            ) from None
        left_out += own
        if found == [normalize(item)] and suffixes and not item.lower().endswith(suffixes):
            packed = item.lower().endswith((".gz", ".zst", ".bz2", ".xz", ".zip"))
            raise ValueError(  # a file named as is, of a kind soulray would misread
                f"{key} entry {item!r} is not a {'/'.join(suffixes)} file; soulray reads only "
                "those ("
                + ("decompress it first, e.g. `gunzip -k`)" if packed else "convert it first)")
            )
        if not found:
            what = "only files an earlier prepare wrote" if own else "no " + "/".join(suffixes)
            raise ValueError(
                f"{key} entry {item!r} matches {what} file; check the path (relative paths "
                "are relative to the directory you run soulray from)"
            )
        files += [f for f in found if f not in files]
    if left_out:
        log.warning(
            "skipping %d file(s) an earlier prepare wrote into data.output_dir (%s, ...)",
            len(left_out),
            left_out[0],
        )
    return files


def input_files(
    files: list[str], known: dict[str, list[Any]] | None = None
) -> dict[str, list[Any]]:
    """Each input file, in order, as [size, mtime_ns, content hash] (the hash None for a remote
    file: its content is not downloaded for this). A local file whose path, size and time match
    `known` (the manifest's record of the last prepare's inputs) is not read again."""
    out: dict[str, list[Any]] = {}
    for file in files:
        fs, inner = resolve(file)
        info = fs.get_file_info(inner)
        size, mtime = info.size, info.mtime_ns
        if not isinstance(fs, pafs.LocalFileSystem):
            out[file] = [size, mtime, None]
            continue
        seen = (known or {}).get(file)
        if seen is not None and seen[:2] == [size, mtime] and seen[2] is not None:
            out[file] = [size, mtime, seen[2]]
        else:
            out[file] = [size, mtime, content_hash(inner)]
    return out


def files_fingerprint(entries: dict[str, list[Any]]) -> str:
    """A short hash of input_files' record, "c:" first: it changes when a file is edited, added,
    removed or reordered. A local file counts by its size and content, not its path or time: a
    Ray job's upload of the project unpacks the same files under a new path with new times on
    every submission, and each was read as changed inputs (prepare ran again; on a real corpus,
    hours). A remote file counts by its path, size and time."""
    digest = hashlib.sha256()
    for file, (size, mtime, content) in entries.items():
        if content is None:
            digest.update(f"{file}\0{size}\0{mtime}\n".encode())
        else:
            digest.update(f"{size}\0{content}\n".encode())
    return "c:" + digest.hexdigest()[:16]


def stat_fingerprint(files: list[str]) -> str:
    """The fingerprint manifests recorded before files_fingerprint (paths, sizes and times):
    compared with an older prepare's manifest, so an upgrade alone does not prepare again."""
    digest = hashlib.sha256()
    for file in files:
        fs, inner = resolve(file)
        info = fs.get_file_info(inner)
        digest.update(f"{file}\0{info.size}\0{info.mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def content_hash(path: str, chunk: int = 1 << 20) -> str:
    """blake2b of a local file's bytes (~1 GB/s on one core)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _excluded(path: str, exclude: list[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in exclude)


def _expand_one(
    item: str, suffixes: tuple[str, ...], exclude: list[str]
) -> tuple[list[str], list[str]]:
    """(the files an entry names, those of them left out as excluded)."""
    if not any(c in item for c in GLOB_CHARS):
        fs, inner = resolve(item)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.Directory:
            listed = _all_files(item)  # one listing for what is read and what is not
            own = [f for f, _ in listed if _excluded(f, exclude)]
            files = [(f, rel) for f, rel in listed if not _excluded(f, exclude)]
            earlier = _prepare_outputs(item, [rel for _, rel in files])
            if earlier:
                log.warning(
                    "warning: %s: not read: what an earlier `soulray prepare` wrote in %s (its "
                    "manifest, rows, tokenizer and rejects: prepared data is no corpus)",
                    item,
                    ", ".join(f"{r}/" if r else "the folder itself" for r in earlier),
                )
                files = [(f, rel) for f, rel in files if not _prepared_file(rel, earlier)]
            found = sorted(f for f, rel in files if _listed(f, rel, suffixes))
            skipped = sorted(rel for f, rel in files if _worth_naming(f, rel, suffixes))
            if skipped:
                names = ", ".join(skipped[:5])
                log.warning(
                    "warning: %s: %d file(s) not read: only %s files are, and none whose name "
                    "or folder starts with '.' or '_' (%s%s)",
                    item,
                    len(skipped),
                    "/".join(suffixes),
                    names,
                    ", ..." if len(skipped) > 5 else "",
                )
            return found, [f for f in own if f.lower().endswith(suffixes)]
        return ([normalize(item)] if kind == pafs.FileType.File else []), []
    matches = _glob(item, suffixes)
    return [f for f in matches if not _excluded(f, exclude)], [
        f for f in matches if _excluded(f, exclude)
    ]


def _prepare_outputs(item: str, rels: list[str]) -> list[str]:
    """The folders (relative; "" for the directory itself) under a directory input that hold an
    earlier prepare's output: a manifest.json of prepare's (its config_hash, splits and
    tokenizer) beside train/, val/ or tokenizer/. Read as corpus, its Parquet rows, tokenizer
    files and rejects became thousands of rejects. A corpus's own manifest.json beside its own
    train/ and val/ is no such thing."""
    dirs: set[str] = set()  # every folder under the input that holds a file, at any depth
    for r in rels:
        parts = r.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    found = []
    for r in rels:
        root, _, name = r.rpartition("/")
        if name != "manifest.json":
            continue
        beside = any((f"{root}/{sub}" if root else sub) in dirs for sub in _ROWS)
        if beside and _is_prepare_manifest(join(item, r)):
            found.append(root)
    return sorted(found)


_ROWS = ("train", "val", "tokenizer")
_MANIFEST_KEYS = ("config_hash", "splits", "tokenizer")


def _is_prepare_manifest(path: str) -> bool:
    try:
        manifest = json.loads(read_text(path))
    except (ValueError, OSError):
        return False
    return isinstance(manifest, dict) and all(k in manifest for k in _MANIFEST_KEYS)


def _prepared_file(rel: str, roots: list[str]) -> bool:
    """Whether a file is one of what prepare writes (soulray.data.manifest.OUTPUTS) in one of
    these folders: a corpus file beside them is still read."""
    from soulray.data.manifest import OUTPUTS

    for root in roots:
        inner = rel[len(root) + 1 :] if root else rel
        if (not root or rel.startswith(root + "/")) and inner.split("/")[0] in OUTPUTS:
            return True
    return False


def _glob(item: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files a glob matches, of a suffix."""
    if not is_remote(item):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        return [normalize(m) for m in matches if Path(m).is_file() and m.lower().endswith(suffixes)]
    base = item[: min(item.index(c) for c in GLOB_CHARS if c in item)].rsplit("/", 1)[0]
    pattern = normalize(item)
    return [f for f in list_files(base, suffixes) if _glob_match(f, pattern)]


def _worth_naming(file: str, rel: str, suffixes: tuple[str, ...]) -> bool:
    """A file a directory input skips that the user may have meant: of another kind, or a data
    file with a hidden name (_train.jsonl). Files in hidden folders (.git/, _synth/) and hidden
    files of other kinds (_SUCCESS, .DS_Store) are bookkeeping, skipped without a word."""
    if _listed(file, rel, suffixes):
        return False
    *folders, name = rel.split("/")
    if any(p.startswith((".", "_")) for p in folders):
        return False
    return not name.startswith((".", "_")) or name.lower().endswith(suffixes)


def _all_files(path: str) -> list[tuple[str, str]]:
    """Every file under a directory (recursive): (its path, its path relative to `path`)."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return [
        (_with_scheme(path, i.path), i.path[len(inner) :].lstrip("/"))
        for i in infos
        if i.type == pafs.FileType.File
    ]


def _glob_match(path: str, pattern: str) -> bool:
    """fnmatch with glob's meaning of '*' (as for local paths): it does not cross a '/'.

    fnmatch alone lets 's3://b/corpus/*.jsonl' take 's3://b/corpus/old/x.jsonl' as well.
    """
    if "**" not in pattern and path.count("/") != pattern.count("/"):
        return False
    return fnmatch.fnmatch(path, pattern)


def _with_scheme(original: str, inner: str) -> str:
    if not is_remote(original):
        return inner
    scheme = original.split("://", 1)[0]
    return f"{scheme}://{inner}"
