"""Model fetch from object storage (a local S3: moto's server): atomic, keyed by content, and
the ingress takes no weights. Only whole exports are served, and serve.wait_for_model_s waits
for one that is missing or still being written (a RayService started with its RayJob)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_storage import bucket, moto_endpoint  # noqa: F401 (the local S3 fixtures)

from soulray import storage
from soulray.config import INCOMPLETE_FILE, load_config
from soulray.serve import fetch
from soulray.serve.fetch import export_problem, fetch_model_dir
from soulray.train.checkpoint import upload_dir


def upload(local: Path, uri: str) -> dict[str, bytes]:
    files = {}
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            files[rel] = path.read_bytes()
            storage.write_bytes(storage.join(uri, rel), files[rel])
    return files


def local_files(directory: str) -> dict[str, bytes]:
    root = Path(directory)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "cache_root", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


def test_fetch_is_atomic_keyed_by_content_and_the_ingress_skips_weights(
    bucket,  # noqa: F811
    tiny_export,
    private_cache,
    monkeypatch,
):
    name, _ = bucket
    uri = f"s3://{name}/runs/model"
    sent = upload(tiny_export, uri)

    real_copy, copied = fetch.copy_file, []

    def dies_midway(source: str, target: Path) -> None:
        if len(copied) == 3:
            raise ConnectionError("network gone")
        copied.append(source)
        real_copy(source, target)

    monkeypatch.setattr(fetch, "copy_file", dies_midway)
    with pytest.raises(ConnectionError):
        fetch_model_dir(uri)
    assert list(private_cache.iterdir()) == []  # nothing half-written is left to be reused
    monkeypatch.setattr(fetch, "copy_file", real_copy)

    first = fetch_model_dir(uri)
    assert local_files(first) == sent  # every file, byte for byte (adapter/ included)
    assert fetch_model_dir(uri) == first  # cached

    meta = fetch_model_dir(uri, weights=False)
    got = local_files(meta)
    assert "model.safetensors" not in got and not any(k.startswith("adapter/") for k in got)
    assert {"config.json", "tokenizer.json", "serving.json", "soulray.yaml"} <= set(got)

    config = sent["config.json"].replace(b'"num_hidden_layers": 2', b'"num_hidden_layers": 2 ')
    storage.write_bytes(storage.join(uri, "config.json"), config)  # a re-export, same URI
    again = fetch_model_dir(uri)
    assert again != first and Path(again, "config.json").read_bytes() == config
    assert sorted(p.name for p in private_cache.iterdir() if p.name.startswith(".")) == []


def test_a_missing_remote_export_is_one_clear_error(bucket, private_cache):  # noqa: F811
    name, _ = bucket
    with pytest.raises(ValueError, match="is empty or does not exist"):
        fetch_model_dir(f"s3://{name}/nothing-here")


# --- whole exports only, and serve.wait_for_model_s -----------------------------------------


@pytest.fixture
def quick_polls(monkeypatch):
    monkeypatch.setattr(fetch, "POLL_S", 0.1)  # a wait looks every 0.1 s instead of every 5 s


def after(seconds: float, action: Callable[[], Any]) -> threading.Thread:
    """Run `action` on a thread `seconds` from now (the RayJob exporting while serving waits)."""

    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def missing_error(path: Path) -> str:
    return (
        f"model directory {path} does not exist; run `soulray train` first or set "
        "serve.engine.model_dir to an export"
    )


def test_without_a_wait_a_missing_export_fails_at_once(tmp_path):
    missing = tmp_path / "model"
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        fetch_model_dir(str(missing))
    assert time.monotonic() - start < 0.5
    assert str(e.value) == missing_error(missing)


def test_a_wait_gives_up_after_its_limit_with_the_error_and_how_long_it_waited(
    tmp_path, quick_polls, monkeypatch, caplog
):
    monkeypatch.setattr(fetch, "LOG_EVERY_S", 0.5)
    missing = tmp_path / "model"
    start = time.monotonic()
    with caplog.at_level("INFO", logger="ray.serve.soulray"), pytest.raises(ValueError) as e:
        fetch_model_dir(str(missing), wait_s=1)
    assert 1.0 <= time.monotonic() - start < 5.0  # gave up at its limit (a loaded VM is slow)
    assert str(e.value) == missing_error(missing) + (
        " (waited 1 s for it: serve.wait_for_model_s=1)"
    )
    line = f"waiting for the export at {missing}: 0 s of 1 (serve.wait_for_model_s; it does not "
    assert [r.getMessage() for r in caplog.records] == [
        line + "exist yet: soulray train writes it)"
    ] * 2  # 0 s, 0.5 s


def test_a_wait_returns_once_the_export_is_written(tmp_path, tiny_export, quick_polls, caplog):
    export = tmp_path / "model"
    writer = after(1.0, lambda: upload_dir(str(tiny_export), str(export)))
    start = time.monotonic()
    with caplog.at_level("INFO", logger="ray.serve.soulray"):
        assert fetch_model_dir(str(export / "adapter"), wait_s=30) == str(export / "adapter")
    assert 1.0 <= time.monotonic() - start < 10.0  # well before its 30 s limit
    writer.join()
    assert not (export / INCOMPLETE_FILE).exists()
    first, *_, last = [r.getMessage() for r in caplog.records]
    assert first == (
        f"waiting for the export at {export}/adapter: 0 s of 30 (serve.wait_for_model_s; it does "
        "not exist yet: soulray train writes it)"
    )
    assert last.startswith(f"the export at {export}/adapter is complete after ")


def test_a_half_written_export_is_refused_and_waited_for(tmp_path, tiny_export, quick_polls):
    export = tmp_path / "model"
    upload_dir(str(tiny_export), str(export))
    marker = export / INCOMPLETE_FILE
    marker.write_text("training died here\n")
    for path in (export, export / "adapter"):  # adapter/ and base/ are part of the export
        with pytest.raises(ValueError) as e:
            fetch_model_dir(str(path), wait_s=1)
        assert str(e.value) == (
            f"model directory {path} is incomplete: soulray train is writing it, or died while "
            f"writing it ({marker} is there until its last file is in); wait for the training "
            "to finish or run it again (waited 1 s for it: serve.wait_for_model_s=1)"
        )
    with pytest.raises(ValueError, match="is incomplete: .* run it again$"):
        fetch_model_dir(str(export))  # no wait: refused at once
    remover = after(1.0, marker.unlink)
    assert fetch_model_dir(str(export), wait_s=30) == str(export)
    remover.join()


def test_an_empty_folder_is_not_an_export_and_only_adapter_and_base_look_above(tmp_path):
    """A folder made but with no file yet (upload_dir's first moment) is refused; a marker in
    the folder above refuses an export's adapter/ or base/, never a model that merely sits
    beside it."""
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^model directory {empty} is empty; run `soulray train`"):
        fetch_model_dir(str(empty))
    (tmp_path / INCOMPLETE_FILE).write_text("another export is being written here\n")
    (empty / "config.json").write_text("{}")
    assert fetch_model_dir(str(empty)) == str(empty)  # its parent's marker is not its own
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is incomplete: soulray train is writing it"):
        fetch_model_dir(str(adapter))


def test_a_remote_export_rewritten_after_the_wait_is_refused(
    bucket,  # noqa: F811
    private_cache,
    tiny_export,
    monkeypatch,
):
    name, _ = bucket
    target = f"s3://{name}/runs/model"
    upload_dir(str(tiny_export), target)
    monkeypatch.setattr(fetch, "wait_for_export", lambda path, wait_s: None)  # raced: it passed
    storage.write_text(storage.join(target, INCOMPLETE_FILE), "a re-export began\n")
    with pytest.raises(ValueError, match=r"is being written again \(its _INCOMPLETE appeared"):
        fetch_model_dir(target)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_export_is_incomplete_from_its_first_write_to_its_last(
    where, tmp_path, tiny_export, private_cache, request, monkeypatch
):
    """upload_dir replacing an export: the old one is whole until the new one starts, then the
    export and its adapter/ are refused until the last file is in."""
    if where == "s3":
        name, _ = request.getfixturevalue("bucket")
        target = f"s3://{name}/runs/model"
    else:
        target = str(tmp_path / "model")
    upload_dir(str(tiny_export), target)
    storage.write_text(storage.join(target, "old.txt"), "a file the new export does not have")
    real_write, seen = storage.write_bytes, []

    def write_and_look(path: str, data: bytes) -> None:
        adapter = storage.join(target, "adapter")
        seen.append((export_problem(target) is None, export_problem(adapter) is None))
        real_write(path, data)

    monkeypatch.setattr(storage, "write_bytes", write_and_look)
    upload_dir(str(tiny_export), target)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    files = local_files(str(tiny_export))
    assert seen == [(True, True)] + [(False, False)] * len(files)  # the marker, then each file
    assert export_problem(target) is None
    assert local_files(fetch_model_dir(target)) == files  # no marker, no old.txt


def test_a_writer_starting_between_the_looks_is_seen(tmp_path, monkeypatch):
    """The marker check, then the listing: a writer that puts its marker in between has made
    the folder non-empty with the marker alone. The export is incomplete, not ready (a fresh
    clone's run saw fetch_model_dir fail on the marker after the wait called it complete)."""
    target = tmp_path / "model"
    target.mkdir()
    real_listdir = os.listdir

    def writer_starts_then_list(path: Any) -> list[str]:
        (target / INCOMPLETE_FILE).write_text("writing")
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", writer_starts_then_list)
    problem = export_problem(str(target))
    assert problem is not None and problem[1].startswith("soulray train is writing it: ")


def test_a_remote_wait_returns_once_the_export_is_written(
    bucket,  # noqa: F811
    tiny_export,
    private_cache,
    quick_polls,
):
    name, _ = bucket
    uri = f"s3://{name}/runs/model"
    with pytest.raises(ValueError) as e:
        fetch_model_dir(uri, wait_s=1)
    assert str(e.value) == (
        f"model directory {uri} is empty or does not exist; check the URI (waited 1 s for it: "
        "serve.wait_for_model_s=1)"
    )
    writer = after(1.0, lambda: upload_dir(str(tiny_export), uri))
    local = fetch_model_dir(uri, weights=False, wait_s=30)
    writer.join()
    meta = {  # what the ingress takes: no weights, no adapter/ or base/, and no marker
        rel: data
        for rel, data in local_files(str(tiny_export)).items()
        if not rel.endswith(fetch.WEIGHT_SUFFIXES) and rel.split("/")[0] not in fetch.WEIGHT_DIRS
    }
    assert local_files(local) == meta and "tokenizer.json" in meta


def test_the_ingress_and_the_engine_replica_both_wait(tmp_path, tiny_export, quick_polls):
    from soulray.serve.app import build_state
    from soulray.serve.engine import HFEngine, LocalClient, engine_args

    export = tmp_path / "model"

    def serve_config(*overrides: str):
        base = [f"serve.engine.model_dir={export}", "serve.safety.enabled=false"]
        return load_config(None, [*base, *overrides]).serve

    gone = serve_config("serve.wait_for_model_s=1")
    for start_replica in (
        lambda: HFEngine(*engine_args(gone, str(export))),
        lambda: build_state(gone, str(export), None),
    ):
        with pytest.raises(ValueError, match=r"does not exist; .* \(waited 1 s for it: "):
            start_replica()
    cfg = serve_config("serve.wait_for_model_s=30")
    writer = after(1.0, lambda: upload_dir(str(tiny_export), str(export)))
    engine = HFEngine(*engine_args(cfg, str(export)))
    writer.join()
    state = build_state(cfg, str(export), LocalClient(engine))
    assert state.info.model_dir == str(export)
    late = serve_config(
        "serve.wait_for_model_s=1", f"serve.adapters=[{{name: a, path: {tmp_path}/a}}]"
    )
    with pytest.raises(ValueError, match=f"model directory {tmp_path}/a does not exist"):
        HFEngine(*engine_args(late, str(export)))  # serve.adapters: waited for at the start
