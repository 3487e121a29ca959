"""Training batches as tensors, and the tokenizer prepare saved beside the data.

Which rows each rank reads, and in which order, is soulray/train/feed.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from soulray import storage

LIST_COLUMNS = ["input_ids", "labels", "position_ids"]
Batch = dict[str, torch.Tensor]


def to_tensors(batch: pa.Table, device: torch.device) -> Batch:
    """Fixed-length list columns -> (rows, seq_len) int64 tensors on the device, plus the
    number of real (non-pad) tokens in the batch."""
    out = {}
    for name in LIST_COLUMNS:
        column = batch.column(name).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)  # honours slices
        out[name] = torch.from_numpy(flat.reshape(len(column), -1)).to(device, non_blocking=True)
    out["num_tokens"] = torch.tensor(pa.compute.sum(batch.column("num_tokens")).as_py() or 0)
    return out


def load_run_tokenizer(data_dir: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer prepare saved beside the data (downloaded first if it is remote)."""

    from soulray.data.tokenizer import load_tokenizer, load_tokenizer_from_files

    directory = storage.join(data_dir, "tokenizer")
    if not storage.exists(directory):
        raise ValueError(
            f"no tokenizer at {directory}: train.data_dir must be the output of `soulray "
            "prepare` (run it first, or point train.data_dir at its data.output_dir)"
        )
    if not storage.is_remote(directory):
        return load_tokenizer(storage.normalize(directory), trust_remote_code)
    files = {f.rsplit("/", 1)[-1]: storage.read_bytes(f) for f in storage.list_files(directory)}
    return load_tokenizer_from_files(files, trust_remote_code)
