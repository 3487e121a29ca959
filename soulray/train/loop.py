"""THE training loop: the same function runs on every worker under Ray Train or torchrun.

`train_loop(cfg, rt)` reads top to bottom: build the sharded model, restore the latest
checkpoint, then for each step run `grad_accum` micro-batches, step the optimizer, and now and
then log, evaluate and checkpoint; at the end save and export. Everything launcher-specific
(where batches come from, where checkpoints go, how metrics are reported) is in `Runtime`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from soulray.config import Config, TrainConfig
from soulray.data.manifest import data_fingerprint, data_tokenizer_hash
from soulray.train.checkpoint import export_model, load_checkpoint, save_checkpoint
from soulray.train.data import Batch, to_tensors
from soulray.train.feed import BatchSource, DataPosition, cycle
from soulray.train.metrics import (
    MetricsLog,
    flops_per_token,
    format_eta,
    peak_flops,
    peak_memory_gib,
)
from soulray.train.model import ONE_ROW_KERNELS, build_model, build_sharded_model

log = logging.getLogger("soulray.train")
IGNORE = -100


@dataclass
class Runtime:
    """What differs between launchers."""

    rank: int
    world_size: int
    device: torch.device
    train_batches: BatchSource  # one epoch of this rank's training micro-batches
    val_batches: BatchSource | None
    tokenizer: Any
    metrics_path: str  # metrics.jsonl of the run
    restore: Callable[[], str | None]  # local dir of the checkpoint to resume from, if any
    checkpoint_dir: Callable[[int], str]  # where to write the checkpoint of a step
    report: Callable[[dict[str, Any], str | None], None]  # metrics (+ checkpoint dir)


def train_loop(cfg: Config, rt: Runtime) -> dict[str, Any]:
    t = cfg.train
    torch.manual_seed(t.seed)
    # --- setup: the sharded model, optimizer, schedule; then resume if a checkpoint exists ----
    model, hf_config, attn, param_dtype = build_sharded_model(cfg, rt.tokenizer, rt.rank, rt.device)
    # each rank its own stream from here (dropout: LoRA's, the model's): one seed for all gave
    # every rank but the one that initialised the weights the same masks
    torch.manual_seed(t.seed + rt.rank)
    one_row = attn in ONE_ROW_KERNELS
    optimizer = build_optimizer(model, t, rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    state: dict[str, Any] = {"step": 0, "micro_batches": 0, "epoch": 0, "epoch_batch": 0}
    state["world_size"] = rt.world_size
    restored = rt.restore()
    if restored:
        state = load_checkpoint(restored, model, optimizer, scheduler)
        # the lr of the step about to run, by this run's schedule: the checkpoint holds the one
        # its own schedule set (they differ when train.steps, warmup or min_lr changed)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(state["step"], t)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        check_resume_world(state, rt, t)
        log_rank0(rt, "resumed from %s at step %d", restored, state["step"])
    # which data the saved position counts rows of (the launchers' resume check compares it)
    state["data_fingerprint"] = data_fingerprint(cfg.train_data_dir)
    # and the tokenizer its ids are of: a resume on data prepared with another is refused
    state["tokenizer_hash"] = data_tokenizer_hash(cfg.train_data_dir)
    start_step = state["step"]  # logged with every step: which attempt trained it
    if start_step > t.steps:
        raise ValueError(past_steps(start_step, t.steps))
    metrics_log = MetricsLog(rt.metrics_path, start_step) if rt.rank == 0 else None
    position = data_position(state)
    batches = cycle(rt.train_batches, position)
    sync_every = sync_every_micro_batch(cfg)
    seq_len = cfg.data.seq_len
    flops = flops_per_token(model, hf_config, seq_len)
    peak = peak_flops(rt.device)
    window = new_window()
    metrics: dict[str, Any] = {}
    log_rank0(
        rt,
        "training %s (%s attention, %s) on %d worker(s) from step %d to %d",
        type(model).__name__,
        attn,
        param_dtype,
        rt.world_size,
        state["step"],
        t.steps,
    )
    # --- the loop ------------------------------------------------------------------------------
    while state["step"] < t.steps:
        micro = [to_tensors(next(batches), rt.device) for _ in range(t.grad_accum)]
        loss, grad_norm, tokens = train_step(model, optimizer, micro, t, rt, sync_every, one_row)
        window["lr"] = scheduler.get_last_lr()[0]  # what this step trained with (logged)
        scheduler.step()
        state["step"] += 1
        state["micro_batches"] += t.grad_accum
        state["epoch"], state["epoch_batch"] = position.epoch, position.batch
        window["loss"] += loss
        window["tokens"] += tokens
        window["padded"] += sum(b["input_ids"].numel() for b in micro) * rt.world_size
        window["steps"] += 1
        step = state["step"]
        last = step == t.steps
        evaluate_now = rt.val_batches is not None and (
            last or (t.eval_every and step % t.eval_every == 0)
        )
        checkpoint_now = last or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if step % t.log_every == 0 or last or evaluate_now or checkpoint_now:
            metrics = step_metrics(window, step, t, scheduler, grad_norm, flops, peak, rt.device)
            metrics["start_step"] = start_step
            if evaluate_now:
                assert rt.val_batches is not None
                metrics["val_loss"] = evaluate(model, rt.val_batches, rt, t, one_row)
            ckpt = None
            if checkpoint_now:
                ckpt = rt.checkpoint_dir(step)
                save_checkpoint(ckpt, model, optimizer, scheduler, state, cfg)
            if metrics_log:
                metrics_log.write(metrics)
                log.info(format_metrics(metrics, t.steps))
            rt.report(metrics, ckpt)
            window = new_window()  # eval and checkpoint time stay out of tokens/s
    if start_step == t.steps and metrics_log is not None and metrics_log.lines:
        # a finished run started again: nothing to train; the export keeps the final metrics
        metrics = json.loads(metrics_log.lines[-1])
        log.info("the run is already at step %d = train.steps: nothing to train", t.steps)
    # --- teardown: export --------------------------------------------------------------------
    export_dtype = torch.bfloat16 if param_dtype == torch.bfloat16 else torch.float32
    export_model(
        model,
        # a copy that only holds the weights to save: eager attention, which every model has
        # (the attention kernel is not saved; a model without sdpa failed here, after training)
        lambda: build_model(cfg, hf_config, "eager", "cpu"),
        rt.tokenizer,
        cfg,
        metrics,
        export_dtype,
    )
    dist.barrier()
    return metrics


def past_steps(done: int, steps: int) -> str:
    return (
        f"this run already trained to step {done}, past train.steps={steps}: a run cannot go "
        "back. Raise train.steps to continue it, or set a new train.run_name to train "
        f"{steps} steps from the start"
    )


def new_window() -> dict[str, Any]:
    return {"loss": 0.0, "tokens": 0, "padded": 0, "steps": 0, "start": time.perf_counter()}


def data_position(state: dict[str, Any]) -> DataPosition:
    """Where the feed resumes. A checkpoint from before epochs were recorded holds only the
    micro-batch count, which `cycle` skips across epochs."""
    if "epoch" in state:
        return DataPosition(state["epoch"], state["epoch_batch"])
    return DataPosition(0, state["micro_batches"])


def sync_every_micro_batch(cfg: Config) -> bool:
    """train.grad_sync resolved: full fine-tuning reduce-scatters after every micro-batch (only
    sharded gradients accumulate); LoRA's few gradients wait for the last micro-batch."""
    match cfg.train.grad_sync:
        case "every_micro_batch":
            return True
        case "last_micro_batch":
            return False
        case "auto":
            return not cfg.lora.enabled
    raise ValueError(f"unknown train.grad_sync {cfg.train.grad_sync!r}")


def train_step(
    model: nn.Module,
    optimizer: Any,
    micro: list[Batch],
    t: TrainConfig,
    rt: Runtime,
    sync_every: bool,
    one_row: bool = False,
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches: (loss, grad norm, real tokens)."""
    loss_sum, targets, tokens = accumulate_gradients(model, micro, t, rt, sync_every, one_row)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return loss_sum / targets, float(norm), tokens


def accumulate_gradients(
    model: nn.Module,
    micro: list[Batch],
    t: TrainConfig,
    rt: Runtime,
    sync_every: bool,
    one_row: bool = False,
) -> tuple[float, float, int]:
    """Forward and backward of every micro-batch: (global loss sum, global targets, tokens).

    The loss is a sum over target tokens divided by the number of target tokens in the whole
    global batch (every rank, every micro-batch), so packing and uneven shards do not bias it;
    FSDP averages gradients over ranks, hence the factor world_size. Gradients are reduced after
    every micro-batch (sync_every: only sharded gradients accumulate) or after the last one.
    """
    counts = torch.tensor(
        [
            sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro),
            sum(int(b["num_tokens"]) for b in micro),
        ],
        dtype=torch.float64,
        device=rt.device,
    )
    dist.all_reduce(counts)
    targets = max(counts[0].item(), 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    fsdp_model: Any = model  # an FSDPModule after fully_shard
    for i, batch in enumerate(micro):
        fsdp_model.set_requires_gradient_sync(sync_every or i == len(micro) - 1)
        loss = token_loss_sum(model, batch, t.loss_chunk_tokens, one_row)
        (loss * rt.world_size / targets).backward()
        loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum)
    return loss_sum.item(), targets, int(counts[1].item())


def token_loss_sum(
    model: nn.Module, batch: Batch, chunk_tokens: int = 0, one_row: bool = False
) -> torch.Tensor:
    """Summed cross-entropy of next-token prediction over the target (assistant) tokens.

    chunk_tokens > 0: the output projection and the fp32 softmax run on the target positions
    only, `chunk_tokens` at a time, each chunk recomputed in backward (activation checkpoint),
    so at most one chunk's logits exist at once instead of (rows x seq_len x vocab) of them.
    0: the model's own full logits (the reference the chunked loss is tested against).
    The labels are shifted (not the logits, which would copy the largest tensor of the step),
    each row on its own; one_row then feeds the model the micro-batch's rows joined end to end
    as one row (ONE_ROW_KERNELS: FlashAttention finds packed sequences only in a single row)."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if one_row:
        inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
        targets = targets.reshape(1, -1)
    if not chunk_tokens:
        logits = model(**inputs, use_cache=False).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
    hidden = final_hidden_states(model, inputs)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]  # (target tokens, hidden), (target tokens,)
    # a transformers model's method; nn.Module's typing sees a Tensor-or-Module attribute
    head = model.get_output_embeddings()  # type: ignore[operator]
    # zero from the head over no rows: a micro-batch without targets still backpropagates
    # through every parameter (FSDP reduces their gradients), to zero gradients
    total = head(hidden[:0]).float().sum()
    for start in range(0, len(targets), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            chunk_loss, head, hidden[piece], targets[piece], use_reentrant=False
        )
    return total


def chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def final_hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's output (what the head projects), from the model's own forward (FSDP's
    hooks gather the root parameters there), asking it for the logits of no position."""
    captured: list[torch.Tensor] = []
    unwrap = getattr(model, "get_base_model", None)  # a peft model wraps the transformers one
    base: Any = unwrap() if unwrap is not None else model
    handle = base.get_decoder().register_forward_hook(
        lambda _m, _i, out: captured.append(out.last_hidden_state)
    )
    try:
        none = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, use_cache=False, logits_to_keep=none)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def evaluate(
    model: nn.Module, source: BatchSource, rt: Runtime, t: TrainConfig, one_row: bool = False
) -> float:
    """Validation loss over every rank's val rows. All ranks run the same number of forwards
    (FSDP all-gathers in each), so a rank with fewer rows runs target-free filler batches."""
    model.eval()
    mine = list(itertools.islice(source(0), t.eval_batches or None))  # no more is read
    count = torch.tensor([len(mine)], device=rt.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    sums = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for i in range(int(count.item())):
        batch = to_tensors(mine[i], rt.device) if i < len(mine) else filler_batch(mine, rt)
        sums[0] += token_loss_sum(model, batch, t.loss_chunk_tokens, one_row).double()
        sums[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def filler_batch(mine: list[pa.Table], rt: Runtime) -> Batch:
    """A batch with no targets, shaped like this rank's batches (or one short row)."""
    if mine:
        batch = to_tensors(mine[0], rt.device)
    else:
        zeros = torch.zeros((1, 8), dtype=torch.long, device=rt.device)
        batch = {
            "input_ids": zeros,
            "position_ids": zeros,
            "labels": zeros,
            "num_tokens": torch.zeros((), dtype=torch.long),
        }
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    return batch


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> Any:
    """AdamW, fused (one kernel for all parameters: on CUDA, and on CPU where it also saves
    the per-parameter DTensor dispatch of the foreach path); no weight decay on norms and biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.lr,
        betas=t.betas,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_factor(step: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio at the last step trained (steps - 1)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - 1 - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_metrics(
    window: dict[str, Any],
    step: int,
    t: TrainConfig,
    scheduler: Any,
    grad_norm: float,
    flops: float,
    peak: float | None,
    device: torch.device,
) -> dict[str, Any]:
    seconds = max(time.perf_counter() - window["start"], 1e-9)
    world = dist.get_world_size()
    padded_per_s = window["padded"] / seconds
    return {
        "step": step,
        "loss": window["loss"] / window["steps"],
        "lr": window.get("lr", scheduler.get_last_lr()[0]),
        "grad_norm": grad_norm,
        "tokens_per_s": window["tokens"] / seconds,
        "tokens_per_s_per_worker": window["tokens"] / seconds / world,
        "mfu": padded_per_s * flops / (peak * world) if peak else None,
        "peak_memory_gib": peak_memory_gib(device),
        "step_time_s": seconds / window["steps"],
        "eta_s": (t.steps - step) * seconds / window["steps"],
    }


def format_metrics(m: dict[str, Any], steps: int) -> str:
    parts = [f"step {m['step']}/{steps}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}", f"tok/s {m['tokens_per_s']:.0f}"]
    if m["mfu"] is not None:
        parts.append(f"mfu {m['mfu']:.1%}")
    parts += [f"mem {m['peak_memory_gib']:.2f}GiB", f"eta {format_eta(m['eta_s'])}"]
    return " | ".join(parts)


def check_resume_world(state: dict[str, Any], rt: Runtime, t: TrainConfig) -> None:
    """A resume on another number of workers: each step's batch (micro_batch_size x
    grad_accum x workers rows) changes with it, and so does the data order."""
    saved = state.get("world_size")
    if isinstance(saved, int) and saved != rt.world_size:
        rows = t.micro_batch_size * t.grad_accum
        log_rank0(
            rt,
            "warning: checkpoint was written by %d workers, resuming with %d: a step now "
            "trains on %d rows, not %d (micro_batch_size x grad_accum x workers), and the "
            "data order differs from an uninterrupted run; train.num_workers=%d keeps both "
            "(a resume cannot change train.grad_accum)",
            saved,
            rt.world_size,
            rows * rt.world_size,
            rows * saved,
            saved,
        )
    state["world_size"] = rt.world_size


def log_rank0(rt: Runtime, msg: str, *args: Any) -> None:
    if rt.rank == 0:
        log.info(msg, *args)
