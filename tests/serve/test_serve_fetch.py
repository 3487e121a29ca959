"""Model fetch from object storage (a local S3: moto's server): atomic, keyed by content, and
the ingress takes no weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_storage import bucket, moto_endpoint  # noqa: F401 (the local S3 fixtures)

from soulray import storage
from soulray.serve import fetch
from soulray.serve.fetch import fetch_model_dir


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
