"""Training memory: the chunked loss equals the full-logits loss, reducing gradients after
every micro-batch gives the gradients of reducing once, and the failure default and error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Qwen2Config

from soulray.config import load_config
from soulray.train.launch import TrainingStopped, max_failures, training_stopped
from soulray.train.loop import IGNORE, accumulate_gradients, sync_every_micro_batch, token_loss_sum

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def packed_batch(rows: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Two sequences per row, about half the positions targets, a pad tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (rows, seq_len), generator=g)
    half = seq_len // 2
    pos = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).expand(rows, -1)
    labels = ids.clone()
    labels[torch.rand(rows, seq_len, generator=g) < 0.5] = IGNORE
    labels[:, -3:] = IGNORE
    return {"input_ids": ids, "position_ids": pos.contiguous(), "labels": labels}


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_the_full_logits_loss_with_its_gradients(tied: bool) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    batch = packed_batch(3, 40, seed=1)
    full = token_loss_sum(model, batch, chunk_tokens=0)
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for chunk in (7, 1000):  # many chunks, and one chunk holding every target
        chunked = token_loss_sum(model, batch, chunk_tokens=chunk)
        torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)
        chunked.backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6)
        model.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_a_micro_batch_without_targets_backpropagates_zero_as_the_full_loss_does(tied) -> None:
    """Hand-made data may hold a micro-batch with no target: its chunked loss is 0 and its
    backward gives every parameter a zero gradient, as the full-logits loss does (it raised
    "does not require grad": no chunk ran, so nothing reached the parameters)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**TINY, tie_word_embeddings=tied), attn_implementation="sdpa"
    )
    batch = packed_batch(2, 16, seed=2)
    batch["labels"][:] = IGNORE
    for chunk in (0, 7):
        loss = token_loss_sum(model, batch, chunk_tokens=chunk)
        assert loss.item() == 0.0
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and not g.any() for g in grads), chunk
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("chunk", [0, 7])
def test_rows_joined_into_one_give_the_same_loss_and_gradients(chunk: int) -> None:
    """FlashAttention 2/3 keep packed sequences apart only in a one-row batch, so for them the
    loop joins a micro-batch's rows (one_row). Targets are still shifted within each row: the
    last position of a row never learns the next row's first token (labelled here)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**TINY), attn_implementation="sdpa")
    batch = packed_batch(3, 40, seed=2)
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a target at every row's first position
    rows = token_loss_sum(model, batch, chunk, one_row=False)
    rows.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    joined = token_loss_sum(model, batch, chunk, one_row=True)
    torch.testing.assert_close(joined, rows, rtol=1e-6, atol=0)
    joined.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6)
    from soulray.train.model import ONE_ROW_KERNELS

    assert {"flash_attention_2", "flash_attention_3"} == ONE_ROW_KERNELS


def test_grad_sync_resolves_per_fine_tuning_kind() -> None:
    assert sync_every_micro_batch(load_config(None, [])) is True
    assert sync_every_micro_batch(load_config(None, ["lora.enabled=true"])) is False
    forced = load_config(None, ["lora.enabled=true", "train.grad_sync=every_micro_batch"])
    assert sync_every_micro_batch(forced) is True


def test_max_failures_defaults_to_restarting_multi_worker_runs() -> None:
    assert max_failures(load_config(None, ["train.num_workers=1"]).train) == 0
    assert max_failures(load_config(None, ["train.num_workers=2"]).train) == 3
    assert (
        max_failures(load_config(None, ["train.num_workers=2", "train.max_failures=0"]).train) == 0
    )


def test_a_run_ray_train_gave_up_on_is_one_error_that_says_a_rerun_resumes() -> None:
    """Ray Train v2's fit() raises when a worker fails more often than train.max_failures
    allows: the CLI showed its traceback; it shows one line naming the failure and the resume."""
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError, WorkerGroupError

    t = load_config(None, ["train.num_workers=2", "train.max_failures=0"]).train
    died = ActorDiedError()
    lost = WorkerGroupError("a worker failed", {1: died})
    stopped = training_stopped(lost, t)
    assert isinstance(stopped, TrainingStopped) and isinstance(stopped, ValueError)
    first = str(died).strip().splitlines()[0][:300]
    assert str(stopped) == (
        f"training stopped (train.max_failures=0 restarts): worker 1: ActorDiedError: "
        f"{first}. Its checkpoints stay in {t.storage_path}/{t.run_name}: run the same command "
        "again to resume from the latest (or raise train.max_failures)"
    )
    controller = ControllerError(RuntimeError("the placement group was removed\nmore"))
    assert "restarts): RuntimeError: the placement group was removed. Its" in str(
        training_stopped(controller, t)
    )
    # a worker's own ValueError (bad data, a config found wrong in the worker) is shown as itself
    bad = WorkerGroupError("a worker failed", {0: ValueError("row 3 is too long")})
    assert training_stopped(bad, t) is None
    # not a ValueError the CLI shows as itself (a library's subclass): the one-line error
    import json

    corrupt = WorkerGroupError("a worker failed", {0: json.JSONDecodeError("bad", "x", 0)})
    assert "worker 0: JSONDecodeError: bad: line 1 column 1 (char 0). Its" in str(
        training_stopped(corrupt, t)
    )


def sharded_gradients(rank: int, world: int, data: str, sync: str, out: str, pg: str) -> None:
    """One rank: the tiny model under FSDP2, two micro-batches of its feed, gradients saved."""
    import torch.distributed as dist

    from soulray.train.data import load_run_tokenizer
    from soulray.train.model import build_sharded_model

    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=world)
    try:
        cfg = load_config(None, [f"data.output_dir={data}", f"train.grad_sync={sync}"])
        model, *_ = build_sharded_model(cfg, load_run_tokenizer(data), rank, torch.device("cpu"))
        micro = [packed_batch(2, 48, seed=10 * rank + i) for i in range(3)]
        for b in micro:
            b["input_ids"] %= 300  # inside the tiny tokenizer's vocabulary
            b["labels"] = torch.where(b["labels"] == IGNORE, IGNORE, b["labels"] % 300)
            b["num_tokens"] = torch.tensor(b["input_ids"].numel())
        rt = SimpleNamespace(device=torch.device("cpu"), world_size=world)
        loss, *_ = accumulate_gradients(model, micro, cfg.train, rt, sync_every_micro_batch(cfg))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_reducing_every_micro_batch_gives_the_same_gradients(prepared_quickstart, tmp_path: Path):
    results = {}
    for sync in ("every_micro_batch", "last_micro_batch"):
        out = str(tmp_path / f"{sync}.pt")
        args = (2, str(prepared_quickstart), sync, out, str(tmp_path / f"pg-{sync}"))
        mp.start_processes(sharded_gradients, args=args, nprocs=2, start_method="spawn")
        results[sync] = torch.load(out)
    every, last = results["every_micro_batch"], results["last_micro_batch"]
    assert every["loss"] == last["loss"]
    assert set(every["grads"]) == set(last["grads"])
    for name, grad in every["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, last["grads"][name], rtol=1e-5, atol=1e-8)


def test_process_group_backend_fits_where_the_tensors_are() -> None:
    """NCCL cannot all-reduce a CPU tensor: with cpu_offload the gradient norm is one."""
    from soulray.train.launch import process_group_backend

    def backend(*overrides: str) -> str:
        return process_group_backend(load_config(None, list(overrides)).train)

    assert backend() == "gloo"
    assert backend("train.use_gpu=true") == "nccl"
    assert backend("train.use_gpu=true", "train.cpu_offload=true") == "cpu:gloo,cuda:nccl"
