"""`soulray train` for real: Ray Train with 2 CPU workers (gloo), torchrun with 2 processes,
on the quickstart corpus and the tiny model. One local Ray for the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from soulray.config import Config, load_config
from soulray.train.data import load_run_tokenizer, to_tensors
from soulray.train.feed import build_source, parquet_chunks, plan_reads
from soulray.train.launch import run_train
from soulray.train.model import build_model, build_model_config, load_initial_state

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def make_config(data: Path, out: Path, name: str, *overrides: str) -> Config:
    return load_config(
        QUICKSTART,
        [
            f"data.output_dir={data}",
            f"train.storage_path={out}",
            f"train.run_name={name}",
            f"train.export_dir={out}/{name}-model",
            "train.log_every=1",
            "train.eval_every=8",
            "train.checkpoint_every=8",
            "train.warmup_steps=2",
            *overrides,
        ],
    )


def read_metrics(cfg: Config) -> list[dict]:
    path = Path(cfg.train.storage_path, cfg.train.run_name, "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def val_loss(model, data: Path) -> float:
    """Next-token cross-entropy per target token over the prepared val split (the loop's
    definition), each packed sequence run alone (as training attends: never across the
    sequences of a row) through the plain transformers forward."""
    total, targets = 0.0, 0
    for path in sorted(data.glob("val/part=*/*.parquet")):
        for row in pq.read_table(path).to_pylist():
            used = row["num_tokens"]
            starts = [i for i, p in enumerate(row["position_ids"][:used]) if p == 0]
            for a, b in zip(starts, [*starts[1:], used], strict=True):
                logits = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0, :-1]
                labels = torch.tensor(row["labels"][a + 1 : b])
                total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                targets += int((labels != -100).sum())
    return float(total) / targets


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    tokenizer = load_run_tokenizer(cfg.data.output_dir)
    return load_initial_state(cfg, build_model_config(cfg.model, tokenizer), "sdpa")


@pytest.fixture(scope="module")
def first_run(ray_local, prepared_quickstart, tmp_path_factory):
    cfg = make_config(
        prepared_quickstart, tmp_path_factory.mktemp("runs"), "main", "train.steps=24"
    )
    result = run_train(cfg)
    assert result.error is None
    return cfg, result


def test_loss_drops_and_every_parameter_changes(first_run) -> None:
    cfg, result = first_run
    metrics = read_metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert result.metrics["step"] == 24
    first = sum(m["loss"] for m in metrics[:4]) / 4
    last = sum(m["loss"] for m in metrics[-4:]) / 4
    assert last < first - 1.0, (first, last)
    assert metrics[-1]["val_loss"] < metrics[7]["val_loss"]
    trained = AutoModelForCausalLM.from_pretrained(cfg.train.export_dir).state_dict()
    initial = initial_state(cfg)
    assert set(trained) == set(initial)
    unchanged = [k for k in initial if torch.equal(trained[k], initial[k])]
    assert unchanged == []


def test_export_loads_generates_and_its_config_reloads(first_run) -> None:
    cfg, _ = first_run
    export = Path(cfg.train.export_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "I can't sleep and I feel alone."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # the export is the model as it ended: its loss on the val split is the run's last val_loss
    last = read_metrics(cfg)[-1]
    assert last["step"] == 24
    assert val_loss(model, Path(cfg.data.output_dir)) == pytest.approx(last["val_loss"], rel=1e-5)
    reloaded = load_config(export / "soulray.yaml")
    assert reloaded.train.steps == 24 and reloaded.data.seq_len == cfg.data.seq_len
    assert json.loads((export / "metrics.json").read_text())["step"] == 24
    record = json.loads((export / "serving.json").read_text())  # what serving must repeat
    assert record["system_prompt"] == cfg.data.system_prompt
    assert record["end_of_turn"] == "<|im_end|>" and len(record["end_of_turn_ids"]) == 1


def test_rerun_with_the_same_name_resumes(first_run) -> None:
    cfg, _ = first_run
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 30})})
    result = run_train(more)
    assert result.error is None and result.metrics["step"] == 30
    metrics = read_metrics(more)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {m["start_step"] for m in metrics if m["step"] > 24} == {24}
    assert metrics[24]["loss"] < metrics[0]["loss"] - 1.0  # continued, not restarted
    # started again when finished: nothing trains, and the export keeps the final metrics
    # (it was written with {}, so `soulray pipeline` never skipped the stage again)
    again = run_train(more)
    assert again.error is None and read_metrics(more) == metrics
    exported = json.loads(Path(more.train.export_dir, "metrics.json").read_text())
    assert exported == metrics[-1]
    fewer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 20})})
    with pytest.raises(ValueError, match="already trained to step 30, past train.steps=20"):
        run_train(fewer)


def test_torchrun_gives_the_same_losses(first_run, prepared_quickstart, tmp_path) -> None:
    cfg, _ = first_run
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
        "-m",
        "soulray.train.torchrun",
        "--config",
        str(QUICKSTART),
        f"data.output_dir={prepared_quickstart}",
        f"train.storage_path={tmp_path}",
        "train.run_name=main",
        f"train.export_dir={tmp_path}/model",
        "train.log_every=1",
        "train.eval_every=8",
        "train.checkpoint_every=8",
        "train.warmup_steps=2",
        "train.steps=24",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    under_torchrun = [
        json.loads(line) for line in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()
    ]
    under_ray = read_metrics(cfg)[:24]
    for a, b in zip(under_ray, under_torchrun, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


def test_loss_is_normalised_by_global_target_tokens(ray_local, prepared_quickstart, tmp_path):
    """2 workers x 2 micro-batches report exactly the loss of one process over the same rows."""
    cfg = make_config(
        prepared_quickstart,
        tmp_path,
        "norm",
        "train.steps=1",
        "train.micro_batch_size=1",
        "train.grad_accum=2",
        "train.eval_every=0",
    )
    result = run_train(cfg)
    assert result.error is None
    reported = read_metrics(cfg)[0]["loss"]
    model = build_model(
        cfg,
        build_model_config(cfg.model, load_run_tokenizer(str(prepared_quickstart))),
        "sdpa",
        "cpu",
    )
    model.load_state_dict(initial_state(cfg))
    total, targets = 0.0, 0
    with torch.no_grad():
        for rank in (0, 1):
            batch = to_tensors(first_rows(cfg, 2, rank, 2), torch.device("cpu"))
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            targets += int((labels != -100).sum())
    assert reported == pytest.approx(total / targets, rel=1e-5)


def first_rows(cfg: Config, world: int, rank: int, rows: int):
    """The rows a rank trains on first: the start of its feed's epoch 0 (the row stream does
    not depend on the micro-batch size)."""
    t = cfg.train
    plan = plan_reads(cfg.data.output_dir, "train", world)[rank]
    source = build_source(lambda: parquet_chunks(plan), rows, t.shuffle_window_rows, t.seed, rank)
    return next(source(0))


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this test's own Ray (children of our raylet)."""
    workers = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:  # a child may exit, or be a zombie left by an earlier test, while we look
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def test_killed_worker_restarts_from_the_last_checkpoint(
    ray_local, prepared_quickstart, tmp_path
) -> None:
    cfg = make_config(
        prepared_quickstart,
        tmp_path,
        "fault",
        "train.steps=20",
        "train.max_failures=1",
        "train.eval_every=0",
    )
    metrics_path = Path(tmp_path, "fault", "metrics.jsonl")
    killed: dict[str, int] = {}
    errors: list[BaseException] = []

    def kill_after_step_10() -> None:
        deadline = time.time() + 300
        try:
            while time.time() < deadline:
                lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
                step = json.loads(lines[-1])["step"] if lines else 0
                if step >= 10:
                    victim = train_workers()[-1]
                    killed.update(pid=victim.pid, step=step)
                    victim.send_signal(signal.SIGKILL)
                    return
                time.sleep(0.02)
        except BaseException as e:  # shown by the test, not lost in a thread
            errors.append(e)

    killer = threading.Thread(target=kill_after_step_10)
    killer.start()
    result = run_train(cfg)
    killer.join()
    assert not errors, errors
    assert killed and 10 <= killed["step"] < 16
    assert not psutil.pid_exists(killed["pid"])
    assert result.error is None and result.metrics["step"] == 20
    metrics = read_metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, 21))  # no step twice, none missing
    assert {m["start_step"] for m in metrics if m["step"] <= 8} == {0}
    assert {m["start_step"] for m in metrics if m["step"] > 8} == {8}
    assert Path(cfg.train.export_dir, "model.safetensors").exists()


def test_lora_changes_only_adapters_and_merges_exactly(prepared_quickstart, tmp_path) -> None:
    from peft import PeftModel

    export = tmp_path / "lora-model"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "soulray.train.torchrun",
        "--config",
        str(QUICKSTART),
        f"data.output_dir={prepared_quickstart}",
        f"train.storage_path={tmp_path}",
        "train.run_name=lora",
        f"train.export_dir={export}",
        "train.steps=6",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "lora.enabled=true",
        "lora.r=4",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    cfg = load_config(export / "soulray.yaml", [f"data.output_dir={prepared_quickstart}"])
    tokenizer = load_run_tokenizer(str(prepared_quickstart))
    initial = build_model(cfg, build_model_config(cfg.model, tokenizer), "sdpa", "cpu")
    initial.load_state_dict(initial_state(cfg))
    initial_base = initial.unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(export / "base")
    for name, value in base.state_dict().items():  # training left the base weights untouched
        assert torch.equal(value, initial_base[name]), name
    adapted = PeftModel.from_pretrained(base, export / "adapter")
    # the adapter carries the training record serving reads when it applies it to base/
    for name in ("soulray.yaml", "serving.json", "generation_config.json"):
        assert (export / "adapter" / name).read_bytes() == (export / name).read_bytes(), name
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: it trained
    merged = AutoModelForCausalLM.from_pretrained(export).state_dict()
    expected = adapted.merge_and_unload().state_dict()
    for name in merged:
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
