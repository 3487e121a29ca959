"""Exact resume: a run killed mid-way and restarted gives, step for step, the losses of a run
that was never interrupted (to the last digit on CPU), and each checkpoint carries its config."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

from soulray.config import load_config
from soulray.data.manifest import data_fingerprint

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
STEPS = 12


def command(data: Path, out: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "soulray.train.torchrun",
        "--config",
        str(QUICKSTART),
        f"data.output_dir={data}",
        f"train.storage_path={out}",
        "train.run_name=run",
        f"train.export_dir={out}/model",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.grad_accum=2",  # gradients reduced per micro-batch, two per step
        "train.shuffle_window_rows=4",  # several windows an epoch, several epochs a run
    ]


def metrics(out: Path) -> list[dict]:
    path = out / "run" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def rank_rows(data: Path, world: int) -> list[int]:
    """Training rows per rank: the partitioned feed gives rank r the part=k folders with
    k % world == r (soulray/train/feed.py)."""
    rows = [0] * world
    for path in data.glob("train/part=*/*.parquet"):
        k = int(path.parent.name.removeprefix("part="))
        rows[k % world] += pq.read_metadata(path).num_rows
    return rows


def position_after(batches: int, rows: int, micro_batch_size: int) -> tuple[int, int]:
    """(epoch, micro-batches into it) once `batches` micro-batches were drawn from epochs of
    ceil(rows / micro_batch_size) each; the last one drawn stays in its epoch."""
    per_epoch = math.ceil(rows / micro_batch_size)
    epoch = (batches - 1) // per_epoch
    return epoch, batches - epoch * per_epoch


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own)."""
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for victim in reversed(victims):
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited since the listing
            victim.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


def run_and_kill_after(cmd: list[str], out: Path, step: int) -> int:
    """Start the run, SIGKILL all its processes once `step` is logged; the step it died at."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            logged = metrics(out)
            if logged and logged[-1]["step"] >= step:
                kill_tree(proc)
                return logged[-1]["step"]
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")


def test_killed_and_resumed_run_matches_an_uninterrupted_one(prepared_quickstart, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(
        command(prepared_quickstart, whole, 29551), cwd=ROOT, check=True, capture_output=True
    )
    broken = tmp_path / "broken"
    died_at = run_and_kill_after(command(prepared_quickstart, broken, 29553), broken, 6)
    assert 6 <= died_at < STEPS
    subprocess.run(
        command(prepared_quickstart, broken, 29555), cwd=ROOT, check=True, capture_output=True
    )
    expected, resumed = metrics(whole), metrics(broken)
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    assert {m["start_step"] for m in resumed if m["step"] > died_at} == {4 * (died_at // 4)}
    for a, b in zip(expected, resumed, strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
        assert a.get("val_loss") == b.get("val_loss")
    checkpoint = broken / "run" / f"checkpoint_{STEPS:08d}"
    saved = load_config(checkpoint / "soulray.yaml")
    assert (saved.train.steps, saved.train.grad_accum) == (STEPS, 2)
    state = json.loads((checkpoint / "soulray_state.json").read_text())
    assert state["micro_batches"] == 2 * STEPS
    # which data the position counts rows of: a resume on data prepared again is warned about
    assert state["data_fingerprint"] == data_fingerprint(str(prepared_quickstart))
    # each rank's data position, from its rows (rank r reads the part=k with k % 2 == r)
    for rank, rows in enumerate(rank_rows(prepared_quickstart, 2)):
        if rank == 0:
            saved_at = (state["epoch"], state["epoch_batch"])
        else:
            data = torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False)["data"]
            saved_at = (data["epoch"], data["epoch_batch"])
        assert saved_at == position_after(2 * STEPS, rows, micro_batch_size=2), rank
    assert sorted(p.name for p in checkpoint.glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    # Raised train.steps: the schedule reshapes from the resumed step on, its first step too
    # (that step used to train with the old schedule's last lr)
    from soulray.train.loop import lr_factor

    longer = [
        f"train.steps={STEPS + 4}" if a == f"train.steps={STEPS}" else a
        for a in command(prepared_quickstart, broken, 29557)
    ]
    subprocess.run(longer, cwd=ROOT, check=True, capture_output=True)
    t, old = (load_config(QUICKSTART, [f"train.steps={n}"]).train for n in (STEPS + 4, STEPS))
    first = next(m for m in metrics(broken) if m["step"] == STEPS + 1)
    assert first["lr"] == t.lr * lr_factor(STEPS, t) != t.lr * lr_factor(STEPS, old)


def test_torchrun_refuses_what_the_ray_launcher_refuses(tmp_path) -> None:
    """The same resume checks before any process group: below the steps trained, and a
    micro-batch size the checkpoint's data position does not count in; and train.use_gpu
    where torch sees no GPU."""
    from soulray.config import config_to_yaml

    common = [f"train.storage_path={tmp_path}", "train.run_name=r", f"data.output_dir={tmp_path}"]
    ckpt = tmp_path / "r" / "checkpoint_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "soulray.yaml").write_text(config_to_yaml(load_config(QUICKSTART, common)))
    (ckpt / "soulray_state.json").write_text(json.dumps({"step": 10}))
    # what a worker killed while writing checkpoint 30 left: no state file, so never resumed
    partial = tmp_path / "r" / "checkpoint_00000030"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 64)
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    cases = [
        (["train.steps=5"], "this run already trained to step 10, past train.steps=5"),
        (
            ["train.steps=20", "train.micro_batch_size=1"],
            "has checkpoints made with another train.micro_batch_size",
        ),
    ]
    if not torch.cuda.is_available():  # it used to train on the CPU instead, silently
        cases.append(
            (["train.steps=20", "train.use_gpu=true"], "train.use_gpu=true but torch sees no CUDA")
        )
    for extra, refusal in cases:
        cmd = [sys.executable, "-m", "soulray.train.torchrun", "--config", str(QUICKSTART)]
        done = subprocess.run(
            [*cmd, *common, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and refusal in done.stderr, done.stderr[-2000:]
        lines = done.stderr.splitlines()  # one line, not a traceback
        assert "Traceback" not in done.stderr
        assert any(x.startswith("error: ") and refusal in x for x in lines)
    typo = subprocess.run(
        [*cmd, *common, "train.stepz=1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert typo.returncode == 2 and "Did you mean 'train.steps'?" in typo.stderr
