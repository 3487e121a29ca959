"""The transformers Trainer baseline for bench/train_throughput.py.

Trains the same tiny model config (built exactly as soulray builds it, same seed) on the same
packed Parquet rows with the same micro-batch, and prints the median step time after warm-up.

    python bench/hf_trainer_baseline.py DATA_DIR STEPS BATCH WARMUP
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from soulray.config import Config
from soulray.train.data import load_run_tokenizer
from soulray.train.model import build_model_config


class Rows(torch.utils.data.Dataset):
    def __init__(self, data_dir: str):
        table = pq.read_table(f"{data_dir}/train", columns=["input_ids", "labels", "position_ids"])
        self.rows = table.to_pylist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v) for k, v in self.rows[i].items()}


class StepTimer(TrainerCallback):
    """Time between consecutive step ends: everything a step costs, data loading included
    (as soulray's own step times are measured)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.ends)]


def main() -> None:
    from _args import existing_dir, non_negative_int, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data", type=existing_dir, metavar="DATA_DIR", help="a prepared run's data directory"
    )
    parser.add_argument("steps", type=positive_int, metavar="STEPS", help="optimizer steps to run")
    parser.add_argument("batch", type=positive_int, metavar="BATCH", help="packed rows per step")
    parser.add_argument(
        "warmup", type=non_negative_int, metavar="WARMUP", help="first steps left out"
    )
    a = parser.parse_args()
    if a.warmup >= a.steps - 1:  # STEPS step ends give STEPS - 1 step times
        parser.error(
            f"WARMUP {a.warmup} leaves no step time of {a.steps} steps (at most STEPS - 2)"
        )
    data, steps, batch, warmup = a.data, a.steps, a.batch, a.warmup
    torch.manual_seed(0)
    config = build_model_config(Config().model, load_run_tokenizer(data))
    config.use_cache = False  # as in soulray's forward: packed rows get per-sequence masks
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Rows(data), callbacks=[timer]).train()
    print(statistics.median(timer.times[warmup:]))


if __name__ == "__main__":
    main()
