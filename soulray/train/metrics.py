"""Training metrics: FLOPs per token, MFU, memory, throughput, and the metrics.jsonl log."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Any

import torch
from torch import nn

from soulray import storage

# Dense bf16 peak FLOP/s (no sparsity), matched against torch.cuda.get_device_name().
BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def flops_per_token(model: nn.Module, hf_config: Any, seq_len: int) -> float:
    """torchtitan's convention: 6N + 12*L*H*d*T, N excluding the input embedding table
    unless it is tied to the output head (then it is the head's matmul and counts). A frozen
    parameter (LoRA's base model) counts 4, not 6: forward and the input's gradient, no
    gradient of its own."""
    embedding = model.get_input_embeddings().weight  # type: ignore[operator]
    tied = getattr(hf_config, "tie_word_embeddings", False)
    matmuls = sum(
        (6 if p.requires_grad else 4) * p.numel()
        for p in model.parameters()
        if tied or p is not embedding
    )
    layers = hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return matmuls + 12 * layers * heads * head_dim * seq_len


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory on GPU; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """Rank 0's metrics.jsonl in the run directory (local, NFS or object storage), and
    TensorBoard event files beside it (local or NFS), so `tensorboard --logdir` follows a live run.

    On resume, entries after the restored step are dropped first: they were trained by the
    attempt that crashed and are trained again, so every step appears exactly once (TensorBoard
    is told the same with purge_step).
    """

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.lines: list[str] = []
        if storage.exists(path):
            for line in storage.read_text(path).splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    self.lines.append(line)
        self._flush()
        self.events = open_event_log(path, resume_step)

    def write(self, metrics: dict[str, Any]) -> None:
        self.lines.append(json.dumps(metrics))
        self._flush()
        if self.events is not None:
            self.events.write(metrics)

    def _flush(self) -> None:
        storage.write_text(self.path, "".join(line + "\n" for line in self.lines))


class EventLog:
    """TensorBoard scalars, written synchronously with tensorboardX's record writer (its
    SummaryWriter queues to a thread that flushes every 2 minutes: a live run would lag and a
    killed worker lose its tail). One event per logged step is cheap."""

    def __init__(self, logdir: str, resume_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(logdir, exist_ok=True)
        # the suffix keeps a resumed attempt started within the same second in its own file
        self.writer = EventsWriter(os.path.join(logdir, "events"), f".from{resume_step}")
        if resume_step:  # TensorBoard drops the crashed attempt's events after this step
            start = SessionLog(status=SessionLog.START)
            self.writer.write_event(
                Event(step=resume_step + 1, wall_time=time.time(), session_log=start)
            )
        self.writer.flush()

    def write(self, metrics: dict[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=key, simple_value=float(value))
            for key, value in metrics.items()
            if isinstance(value, int | float) and key != "step"
        ]
        event = Event(step=metrics["step"], wall_time=time.time(), summary=Summary(value=values))
        self.writer.write_event(event)
        self.writer.flush()


def open_event_log(metrics_path: str, resume_step: int) -> EventLog | None:
    """Event files in metrics.jsonl's directory; None on object storage (s3://, gs://), where
    metrics.jsonl (and `soulray report`) remain the record."""
    if storage.is_remote(metrics_path):
        return None
    return EventLog(storage.normalize(metrics_path).rsplit("/", 1)[0], resume_step)
