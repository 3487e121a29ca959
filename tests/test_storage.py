"""Paths: local files, globs and directories, and real s3:// object storage served by a local
moto server (pyarrow reaches it through AWS_ENDPOINT_URL, exactly as it would reach MinIO)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from soulray import storage
from soulray.data.formats import FILE_SUFFIXES, split_records

JSONL = (".jsonl",)
JSON_KINDS = (".jsonl", ".json", ".parquet")


def make_tree(root) -> None:
    for rel in [
        "a.jsonl",
        "b.json",
        "notes.txt",
        "sub/c.jsonl",
        "sub/deep/d.jsonl",
        ".hidden.jsonl",
        "_tmp/e.jsonl",
        "sub/.cache/f.jsonl",
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{rel}\n")


def test_expand_files_directories_and_globs(tmp_path):
    make_tree(tmp_path)
    t = str(tmp_path)
    assert storage.expand_inputs([t], JSONL) == [
        f"{t}/a.jsonl",
        f"{t}/sub/c.jsonl",
        f"{t}/sub/deep/d.jsonl",
    ]
    assert storage.expand_inputs([t], FILE_SUFFIXES) == [
        f"{t}/a.jsonl",
        f"{t}/b.json",
        f"{t}/sub/c.jsonl",
        f"{t}/sub/deep/d.jsonl",
    ]
    assert storage.expand_inputs([f"{t}/*.jsonl"], JSONL) == [f"{t}/a.jsonl"]  # '*' stops at '/'
    # an explicit glob follows glob's rules: only dot-files are hidden, "_tmp" is not
    assert storage.expand_inputs([f"{t}/**/*.jsonl"], JSONL) == [
        f"{t}/_tmp/e.jsonl",
        f"{t}/a.jsonl",
        f"{t}/sub/c.jsonl",
        f"{t}/sub/deep/d.jsonl",
    ]
    assert storage.expand_inputs([f"{t}/sub/c.jsonl"], JSONL) == [f"{t}/sub/c.jsonl"]


def test_expand_keeps_input_order_and_drops_repeats(tmp_path):
    make_tree(tmp_path)
    t = str(tmp_path)
    got = storage.expand_inputs(
        [f"{t}/sub", f"{t}/a.jsonl", f"{t}/sub/*.jsonl", f"{t}/sub/"], JSONL
    )
    assert got == [f"{t}/sub/c.jsonl", f"{t}/sub/deep/d.jsonl", f"{t}/a.jsonl"]


def test_relative_and_file_uri_paths_become_absolute(tmp_path, monkeypatch):
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert storage.expand_inputs(["sub/c.jsonl", "*.jsonl"], JSONL) == [
        f"{tmp_path}/sub/c.jsonl",
        f"{tmp_path}/a.jsonl",
    ]
    assert storage.normalize(f"file://{tmp_path}/a.jsonl") == f"{tmp_path}/a.jsonl"
    assert storage.normalize("s3://bucket/dir/") == "s3://bucket/dir"


@pytest.mark.parametrize("entry", ["missing.jsonl", "missing_dir/*.jsonl", "notes.txt_dir"])
def test_missing_inputs_raise_a_clear_error(tmp_path, entry):
    make_tree(tmp_path)
    path = f"{tmp_path}/{entry}"
    with pytest.raises(ValueError, match=r"data.inputs entry '.*' matches no \.jsonl file"):
        storage.expand_inputs([f"{tmp_path}/a.jsonl", path], JSONL)


def test_a_named_file_of_another_kind_is_refused_by_name(tmp_path):
    """Named as is (not found through a directory or glob, which skip it), a .gz or .txt
    would be parsed as JSON lines: one invalid_json reject per line of garbage."""
    make_tree(tmp_path)
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    for entry, fix in (
        ("a.jsonl.gz", "decompress it first, e.g. `gunzip -k`"),
        ("notes.txt", "convert it first"),
    ):
        with pytest.raises(
            ValueError, match=rf"^data.inputs entry '.*/{entry}' is not a \.jsonl"
        ) as e:
            storage.expand_inputs([f"{tmp_path}/{entry}"], JSONL)
        assert str(e.value).endswith(f"soulray reads only those ({fix})")
    assert storage.expand_inputs([f"{tmp_path}/a.jsonl"], JSONL) == [f"{tmp_path}/a.jsonl"]


def test_directory_without_matching_files_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match=f"entry '{tmp_path}/_tmp' matches no"):
        storage.expand_inputs([f"{tmp_path}/_tmp"], (".parquet",))


def test_local_write_read_exists_delete(tmp_path):
    target = storage.join(str(tmp_path), "run", "deep", "manifest.json")
    storage.write_text(target, '{"ok": true}')  # creates the parent folders
    assert storage.read_text(target) == '{"ok": true}'
    assert storage.exists(target) and not storage.exists(f"{tmp_path}/nothing")
    assert storage.list_files(f"{tmp_path}/run") == [target]
    storage.delete_dir(f"{tmp_path}/run")
    assert not storage.exists(f"{tmp_path}/run")
    storage.delete_dir(f"{tmp_path}/run")  # deleting what is gone is fine


def test_a_local_rewrite_is_never_seen_half_written(tmp_path, monkeypatch):
    """metrics.jsonl is rewritten every step while `soulray report`, TensorBoard or a test
    follows it: until the new content is complete, the old one stays whole (and a failed write
    leaves it so, with no temporary file behind)."""
    path = str(tmp_path / "metrics.jsonl")
    storage.write_text(path, '{"step": 1}\n')
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((storage.read_text(path), storage.read_text(src)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    storage.write_text(path, '{"step": 1}\n{"step": 2}\n')
    assert seen == [('{"step": 1}\n', '{"step": 1}\n{"step": 2}\n')]
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(path, "lost")
    assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_join_and_is_remote():
    assert storage.join("s3://bucket/run/", "train", "part-0.parquet") == (
        "s3://bucket/run/train/part-0.parquet"
    )
    assert storage.join("/data/run", "train") == "/data/run/train"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/s3://x")


# Object storage ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """A local S3 (moto's server) for this module; skipped when moto[server] is not installed."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (dev extra)")
    pytest.importorskip("boto3")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint}")
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    """A fresh bucket; pyarrow and boto3 both find the endpoint in the environment."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    name = f"soulray-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name, client


RECORD = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
)


def test_s3_expand_inputs_and_read_bytes(bucket):
    name, client = bucket
    for key in [
        "corpus/a.jsonl",
        "corpus/b.json",
        "corpus/old/c.jsonl",
        "corpus/readme.md",
        "corpus/_tmp/d.jsonl",
    ]:
        client.put_object(Bucket=name, Key=key, Body=RECORD + b"\n")
    root = f"s3://{name}/corpus"
    assert storage.expand_inputs([root], JSONL) == [f"{root}/a.jsonl", f"{root}/old/c.jsonl"]
    assert storage.expand_inputs([f"{root}/*.jsonl"], JSONL) == [f"{root}/a.jsonl"]
    assert storage.expand_inputs([f"{root}/*/*.jsonl"], JSONL) == [f"{root}/old/c.jsonl"]
    assert storage.expand_inputs([f"{root}/b.json", f"{root}/"], FILE_SUFFIXES) == [
        f"{root}/b.json",
        f"{root}/a.jsonl",
        f"{root}/old/c.jsonl",
    ]
    data = storage.read_bytes(f"{root}/a.jsonl")
    assert data == RECORD + b"\n"
    (record,) = split_records(f"{root}/a.jsonl", data)
    assert (record.location, record.error) == (f"{root}/a.jsonl:1", None)
    with pytest.raises(ValueError, match=f"data.inputs entry 's3://{name}/nothing' matches no"):
        storage.expand_inputs([f"s3://{name}/nothing"], JSONL)


def test_s3_write_text_lands_in_the_bucket(bucket):
    name, client = bucket
    target = storage.join(f"s3://{name}/runs/x", "data", "manifest.json")
    storage.write_text(target, '{"conversations": 3}')
    body = client.get_object(Bucket=name, Key="runs/x/data/manifest.json")["Body"].read()
    assert body == b'{"conversations": 3}'  # read back by boto3, not by pyarrow
    assert storage.exists(target) and not storage.exists(f"s3://{name}/runs/x/other.json")
    assert storage.list_files(f"s3://{name}/runs") == [target]
    storage.delete_dir(f"s3://{name}/runs/x")
    assert client.list_objects_v2(Bucket=name, Prefix="runs/x/").get("KeyCount") == 0


def test_report_reads_and_writes_a_run_on_s3(bucket):
    """`soulray report s3://...`: a cluster's run dir is in object storage (README "On a
    cluster"); the URI reaches storage whole (as a Path it was s3:/bucket/..., "does not
    exist")."""
    from typer.testing import CliRunner

    from soulray.cli import app

    name, client = bucket
    rows = [{"step": s, "loss": 4.0 - s / 10, "lr": 1e-3, "start_step": 0} for s in (10, 20)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    client.put_object(Bucket=name, Key="runs/r/checkpoints/r/metrics.jsonl", Body=body)
    result = CliRunner().invoke(app, ["report", f"s3://{name}/runs/r"])
    assert result.exit_code == 0, result.output
    assert (
        result.output == f"wrote s3://{name}/runs/r/checkpoints/r/report/report.md and its curves\n"
    )
    md = client.get_object(Bucket=name, Key="runs/r/checkpoints/r/report/report.md")["Body"].read()
    assert "- loss: 3.0000 at step 10 -> 2.0000" in md.decode()


def test_s3_reads_honour_the_endpoint_variable(bucket):
    """pyarrow's S3FileSystem takes AWS_ENDPOINT_URL from the environment (no code change)."""
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(f"s3://{bucket[0]}/x")
    assert isinstance(fs, pafs.S3FileSystem) and inner == f"{bucket[0]}/x"
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert fs.get_file_info(bucket[0]).type == pafs.FileType.Directory  # the moto bucket


def test_a_training_checkpoint_on_s3_is_restored_where_it_is_stored(bucket, tmp_path):
    """Resume reads a checkpoint's DCP shards from s3:// itself (train.storage_path on an object
    store, as jobs/llama3-8b-2x8xh100.yaml has it). torch's DCP reads a URI with fsspec, which
    needs s3fs: every resume failed with "Install s3fs to access S3", each restart again."""
    import torch
    import torch.distributed as dist

    from soulray.config import load_config
    from soulray.train.checkpoint import load_checkpoint, save_checkpoint

    def trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(steps):
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    name, _ = bucket
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, optimizer, scheduler = trained(3)
        local = tmp_path / "checkpoint_00000003"
        local.mkdir()
        state = {"step": 3, "micro_batches": 3, "epoch": 1, "epoch_batch": 2, "world_size": 1}
        save_checkpoint(str(local), model, optimizer, scheduler, state, load_config(None, []))
        remote = f"s3://{name}/runs/r/checkpoint_00000003"
        for path in local.iterdir():  # as Ray Train uploads it (.metadata included)
            storage.write_bytes(storage.join(remote, path.name), path.read_bytes())
        fresh, fresh_optimizer, fresh_scheduler = trained(0)
        restored = load_checkpoint(remote, fresh, fresh_optimizer, fresh_scheduler)
    finally:
        dist.destroy_process_group()
    assert (restored["step"], restored["epoch"], restored["epoch_batch"]) == (3, 1, 2)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    moments = fresh_optimizer.state[fresh.weight]
    assert torch.equal(moments["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert float(moments["step"]) == 3.0


def test_s3_byte_ranges_read_the_same_records_as_local(bucket, tmp_path):
    """A big JSON array on s3:// is scanned and parsed with ranged reads: every chunk scan and
    every range gives what the same file gives locally (the plan itself runs on Ray elsewhere:
    tests/data/test_ranges.py)."""
    import json

    from soulray.data import ranges

    name, client = bucket
    records = [{"messages": [{"role": "user", "content": f'q{i} "[,]" \\'}]} for i in range(300)]
    items = [json.dumps(r).encode() for r in records]
    body = b"[" + b", ".join(items) + b"]"
    starts = [1 + sum(len(x) + 2 for x in items[:i]) for i in range(len(items))]
    ends = [s + len(x) for s, x in zip(starts, items, strict=True)]
    local = tmp_path / "big.json"
    local.write_bytes(body)
    client.put_object(Bucket=name, Key="big.json", Body=body)
    remote = f"s3://{name}/big.json"
    assert ranges.file_size(remote) == len(body)
    assert ranges.edge_bytes(remote, len(body)) == ranges.edge_bytes(str(local), len(body))
    for start, end in ranges.chunk_bounds(len(body), 1000):
        got, want = (ranges.scan_array_chunk(p, start, end) for p in (remote, str(local)))
        assert got[0] == want[0] and (got[1] == want[1]).all() and (got[2] == want[2]).all()
    halves = [
        ranges.Range(k, remote, "array", starts[a], ends[b - 1], a, starts[a:b], ends[a:b])
        for k, (a, b) in enumerate([(0, 150), (150, 300)])
    ]
    got = [(x.location, x.record) for r in halves for x in ranges.range_records(r)]
    assert got == [(f"{remote}[{i}]", rec) for i, rec in enumerate(records)]


def test_a_directory_input_names_the_files_it_does_not_read(tmp_path, caplog) -> None:
    from soulray.storage import expand_inputs

    (tmp_path / "sub").mkdir()
    (tmp_path / "_synth").mkdir()  # bookkeeping ('.' or '_'): skipped without a warning
    files = ("a.jsonl", "_b.jsonl", "c.jsonl.gz", "sub/d.tsv", "sub/e.json", "_synth/f.json")
    for name in (*files, "_SUCCESS", ".DS_Store"):
        (tmp_path / name).write_text("{}\n")
    with caplog.at_level("WARNING", logger="soulray.storage"):
        found = expand_inputs([str(tmp_path)], (".json", ".jsonl"))
    assert found == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "e.json")]
    assert caplog.messages == [  # not _synth/f.json, _SUCCESS, .DS_Store: bookkeeping
        f"warning: {tmp_path}: 3 file(s) not read: only .json/.jsonl files are, and none whose "
        "name or folder starts with '.' or '_' (_b.jsonl, c.jsonl.gz, sub/d.tsv)"
    ]


def test_what_an_earlier_prepare_wrote_is_left_out_but_nothing_else(tmp_path, caplog):
    """data.output_dir may sit inside an input folder, or above it (data.output_dir=.): only
    the files prepare itself writes there are left out, never the corpus, nor a file named."""
    from soulray.data.manifest import prepare_outputs

    for name in (
        "raw/a.jsonl",
        "train/part=0/r.parquet",
        "tokenizer/tokenizer.json",
        "manifest.json",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    own = prepare_outputs(str(tmp_path))
    corpus = str(tmp_path / "raw" / "a.jsonl")
    with caplog.at_level("WARNING", logger="soulray.storage"):
        assert storage.expand_inputs([str(tmp_path)], JSON_KINDS, exclude=own) == [corpus]
    assert "skipping 3 file(s) an earlier prepare wrote into data.output_dir" in caplog.text
    assert storage.expand_inputs([f"{tmp_path}/raw"], JSON_KINDS, exclude=own) == [corpus]
    assert storage.expand_inputs([f"{tmp_path}/**/*.json*"], JSON_KINDS, exclude=own) == [corpus]
    named = str(tmp_path / "manifest.json")
    assert storage.expand_inputs([named], JSON_KINDS, exclude=own) == [named]
    with pytest.raises(ValueError, match="matches only files an earlier prepare wrote"):
        storage.expand_inputs([f"{tmp_path}/train"], JSON_KINDS, exclude=own)


def test_an_unreachable_object_store_is_one_clear_error(monkeypatch):
    """An s3 input the machine cannot reach names the entry, pyarrow's reason and what to
    check, instead of a traceback through the listing (a closed local port: ~6 s of retries)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError) as info:
        storage.expand_inputs(["s3://corpus/a.jsonl"], JSONL)
    message = str(info.value)
    assert message.startswith("data.inputs entry 's3://corpus/a.jsonl' cannot be listed: ")
    assert "Could not connect to server" in message and "AWS_ACCESS_KEY_ID" in message
    assert info.value.__suppress_context__  # `from None`: the CLI prints this line alone


def test_local_inputs_count_by_content_not_by_path_or_time(tmp_path):
    """A Ray job's upload unpacks the same corpus under a new path with new times on every
    submission: read as changed inputs, prepare ran again each time."""
    import os
    import shutil

    from soulray.storage import files_fingerprint, input_files

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (first / "x.jsonl").write_text('{"messages": []}\n')
    (first / "y.jsonl").write_text('{"messages": [1]}\n')
    shutil.copytree(first, second)
    os.utime(second / "x.jsonl", ns=(1, 1))
    listed = [str(first / "x.jsonl"), str(first / "y.jsonl")]
    moved = [str(second / "x.jsonl"), str(second / "y.jsonl")]

    def fingerprint(files, known=None):
        return files_fingerprint(input_files(files, known))

    assert fingerprint(listed) == fingerprint(moved)
    assert fingerprint(listed) != fingerprint(listed[::-1])  # the order is read
    (second / "y.jsonl").write_text('{"messages": [2]}\n')  # same size, one byte changed
    assert fingerprint(listed) != fingerprint(moved)
    # a file whose path, size and time the last prepare recorded is not read again
    known = input_files(listed)
    known[listed[0]][2] = "recorded"
    assert input_files(listed, known)[listed[0]][2] == "recorded"
    os.utime(listed[0], ns=(5, 5))  # touched: read again
    assert input_files(listed, known)[listed[0]][2] != "recorded"


def test_an_earlier_prepare_output_inside_an_input_folder_is_not_read(tmp_path, caplog):
    """data.output_dir changed between runs, the old output left inside the input folder: its
    rows, tokenizer, manifest and rejects were read as corpus (one reject each)."""
    for name in (
        "corpus/a.jsonl",
        "corpus/old/train/part=0/r.parquet",
        "corpus/old/tokenizer/tokenizer.json",
        "corpus/old/manifest.json",
        "corpus/old/rejects.jsonl",
        "corpus/old/notes.jsonl",  # not prepare's: read
        "corpus/other/manifest.json",  # a manifest alone: no prepare output, read
        "corpus/own/manifest.json",  # a corpus's own manifest beside its own splits: read
        "corpus/own/train/t.jsonl",
        "corpus/own/val/v.jsonl",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    prepared = {"config_hash": "x", "splits": {}, "tokenizer": {}}
    (tmp_path / "corpus" / "old" / "manifest.json").write_text(json.dumps(prepared))
    with caplog.at_level("WARNING", logger="soulray.storage"):
        found = storage.expand_inputs([str(tmp_path / "corpus")], JSON_KINDS)
    kept = ("a.jsonl", "old/notes.jsonl", "other/manifest.json", "own/manifest.json")
    assert found == [str(tmp_path / "corpus" / n) for n in kept] + [
        str(tmp_path / "corpus" / "own" / n) for n in ("train/t.jsonl", "val/v.jsonl")
    ]
    assert "what an earlier `soulray prepare` wrote in old/" in caplog.text
    assert "own/" not in caplog.text
