"""Checkpoints (sharded, torch.distributed.checkpoint) and the final Hugging Face export.

A checkpoint directory holds every rank's DCP shards of the model and optimizer and its RNG
state (`rng_rank<r>.pt`), plus from rank 0 `soulray_state.json` (exactly what `state` in the
loop holds: the step, the data position as epoch + micro-batches into it, the world size, and
the LR scheduler) and `soulray.yaml`, the resolved config that wrote it. Resume reads it where
it is stored (a local/NFS path or s3:// gs://): DCP fetches each rank's own shards only.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from soulray import storage
from soulray.config import (
    CONFIG_FILE,
    INCOMPLETE_FILE,
    METRICS_FILE,
    Config,
    TrainConfig,
    config_to_yaml,
)
from soulray.data.render import SERVING_RECORD, build_serving_record

log = logging.getLogger("soulray.train")

STATE_FILE = "soulray_state.json"
# A checkpoint's folder in a run's directory listing (storage.list_files): its step
CHECKPOINT_RE = re.compile(r"/checkpoint_(\d+)/")


def run_dir(t: TrainConfig) -> str:
    """A run's directory, train.storage_path/train.run_name: where Ray Train (RunConfig name and
    storage_path) and the torchrun launcher keep its checkpoints and metrics.jsonl."""
    return storage.join(t.storage_path, t.run_name)


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint of `step` in the run's directory (zero-padded: sorted by
    name is sorted by step)."""
    return f"checkpoint_{step:08d}"


def save_checkpoint(
    directory: str,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    cfg: Config,
) -> None:
    """Every rank writes its shards, RNG state and its own data position (ranks hold different
    numbers of rows, so their epochs end at different micro-batches) into `directory` (a local
    folder); rank 0 adds the loop state and the resolved config."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    rank = dist.get_rank()
    mine = {"epoch": state["epoch"], "epoch_batch": state["epoch_batch"]}
    torch.save(rng_state() | {"data": mine}, Path(directory, f"rng_rank{rank}.pt"))
    # STATE_FILE marks the checkpoint complete (torchrun resumes from the latest with one):
    # written once every rank's file is in, or a kill in between would leave a rank's
    # position missing from a "complete" checkpoint (it would resume at rank 0's)
    dist.barrier()
    if rank == 0:
        extra = state | {"scheduler": scheduler.state_dict()}
        Path(directory, STATE_FILE).write_text(json.dumps(extra))
        Path(directory, CONFIG_FILE).write_text(config_to_yaml(cfg))


def load_checkpoint(
    location: str, model: nn.Module, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG in place from a checkpoint where
    it is stored (local path or object-store URI); return the loop state, with this rank's own
    data position where the checkpoint has it."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=checkpoint_reader(location))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = json.loads(storage.read_text(storage.join(location, STATE_FILE)))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = storage.join(location, f"rng_rank{dist.get_rank()}.pt")
    if storage.exists(rng):  # absent when resuming with more workers than wrote it
        saved = torch.load(io.BytesIO(storage.read_bytes(rng)), weights_only=False)
        set_rng_state(saved)
        state.update(saved.get("data", {}))  # older checkpoints: rank 0's position for all
    return state


def checkpoint_reader(location: str) -> dcp.FileSystemReader:
    """DCP's reader of a checkpoint where it is stored. On s3:// gs:// it reads through
    soulray.storage (pyarrow): given the URI, DCP would read it with fsspec, which needs s3fs or
    gcsfs (not installed), so every resume from an object store failed ("Install s3fs")."""
    reader = dcp.FileSystemReader(location)
    if storage.is_remote(location):
        reader.fs = ObjectStoreFiles()
        reader.path = reader.fs.init_path(location)
    return reader


class ObjectStoreFiles(FileSystem):
    """What DCP's reader opens (the interface of its local FileSystem) on an object store, through
    pyarrow.fs and fsspec's wrapper of it: ranged reads, so a rank fetches only its shards.
    Checkpoints are written locally and uploaded by Ray Train, so nothing here writes."""

    fs: Any = None  # fsspec's ArrowFSWrapper of the store, set by init_path

    def init_path(self, path: str | os.PathLike) -> str:
        from fsspec.implementations.arrow import ArrowFSWrapper

        fs, inner = storage.resolve(str(path))
        self.fs = ArrowFSWrapper(fs)
        return inner

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with self.fs.open(str(path), mode) as stream:
            yield stream

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{path}/{suffix}"

    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.exists(str(path))


def rng_state() -> dict[str, Any]:
    """What the step draws from (dropout, LoRA dropout): the CPU generator, and the generator
    of the GPU this rank trains on (torch.cuda.set_device's), when it computes on one."""
    gpu = _rank_gpu()
    cuda = None if gpu is None else torch.cuda.get_rng_state(gpu)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _rank_gpu() -> int | None:
    """The GPU this rank computes on; None for a CPU worker, also on a GPU node (never
    initialise CUDA for this)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.current_device()


def set_rng_state(saved: dict[str, Any]) -> None:
    """Restore rng_state(): into this rank's own GPU, whichever index it has now (a restarted
    Ray worker can land on another GPU of the node, or see fewer of them)."""
    torch.set_rng_state(saved["cpu"])
    gpu, cuda = _rank_gpu(), saved.get("cuda")
    if isinstance(cuda, list):  # checkpoints before stop 31 saved every visible GPU's state
        cuda = cuda[gpu] if gpu is not None and gpu < len(cuda) else None
    if cuda is not None and gpu is not None:
        torch.cuda.set_rng_state(cuda, gpu)


def export_model(
    model: nn.Module,
    build_cpu_model: Any,
    tokenizer: Any,
    cfg: Config,
    metrics: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    """Write a Hugging Face model directory to train.export_dir (rank 0; all ranks gather).

    Full fine-tune: model.safetensors at the root. LoRA: the adapter alone in adapter/ and
    the merged model at the root, so the root always loads with AutoModelForCausalLM (and vLLM);
    with the tiny default (no base checkpoint on disk) the base model is written to base/ and
    the adapter points at it.
    """
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() != 0:
        return
    cpu_model = build_cpu_model()
    cpu_model.load_state_dict(full)
    with tempfile.TemporaryDirectory(prefix="soulray-export-") as local:
        if cfg.lora.enabled:
            save_adapter(cpu_model, local, cfg, tokenizer, dtype)
            cpu_model = cpu_model.merge_and_unload()
        cpu_model.to(dtype)
        cpu_model.config.use_cache = True
        cpu_model.save_pretrained(local)
        tokenizer.save_pretrained(local)
        record = build_serving_record(tokenizer, cfg.data.system_prompt)
        base_dir = cfg.model.name_or_path  # a local one is absolute here (resolve_paths)
        # How training rendered and sampled: beside the merged model, and beside the adapter,
        # whose own record serving reads when it applies it to base/ (or to the real base)
        for where in [local, *([os.path.join(local, "adapter")] if cfg.lora.enabled else [])]:
            gen = build_generation_config(tokenizer, record["end_of_turn_ids"], base_dir)
            gen.save_pretrained(where)
            Path(where, SERVING_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False))
            Path(where, CONFIG_FILE).write_text(config_to_yaml(cfg))
        Path(local, METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        upload_dir(local, cfg.train.export_dir)
    log.info("exported the model to %s", cfg.train.export_dir)


def save_adapter(
    peft_model: Any, local: str, cfg: Config, tokenizer: Any, dtype: torch.dtype
) -> None:
    """adapter/ (peft format); base/ too when the base is the tiny model built from config."""
    base = cfg.model.name_or_path
    if base is None:
        base = storage.join(cfg.train.export_dir, "base")
        base_model = copy.deepcopy(peft_model).unload().to(dtype)
        base_model.save_pretrained(os.path.join(local, "base"))
        tokenizer.save_pretrained(os.path.join(local, "base"))
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base
    peft_model.save_pretrained(os.path.join(local, "adapter"))


def build_generation_config(
    tokenizer: Any, end_of_turn_ids: list[int] | None = None, base: str | None = None
) -> Any:
    """Sampling defaults for a supportive reply; stops at eos and at the chat template's
    end-of-turn token when that is one other token (so transformers and vLLM stop there too).
    The base model's generation_config.json (local or hub) adds its stop ids (Qwen2.5-Instruct's
    <|endoftext|> beside <|im_end|>) and, when it samples, its authors' sampling settings; a
    greedy base's (do_sample false: Qwen2.5-7B) leaves soulray's sampling, and its other keys
    (max_new_tokens 2048, beam settings) are not taken either."""
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id]
    if end_of_turn_ids and len(end_of_turn_ids) == 1 and end_of_turn_ids[0] not in eos:
        eos.append(end_of_turn_ids[0])
    gen = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    theirs = base_generation_config(base)
    if theirs is not None:
        stops = theirs.eos_token_id
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        eos = [*stops, *(i for i in eos if i not in stops)]
        if theirs.do_sample:
            for key in SAMPLING_KEYS:
                setattr(gen, key, getattr(theirs, key))
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    gen.validate(strict=True)  # save_pretrained's check, here rather than after training
    return gen


def base_generation_config(base: str | None) -> Any:
    """The base model's generation config: a local folder's generation_config.json, or a hub
    model's (from the cache its weights were read through); None when it has none."""
    from transformers import GenerationConfig

    if base is None:
        return None
    if Path(base).is_dir():
        has = Path(base, "generation_config.json").is_file()
        return GenerationConfig.from_pretrained(base) if has else None
    try:
        return GenerationConfig.from_pretrained(base)
    except OSError:  # the repo ships none (or the hub is out of reach from this process)
        log.info("%s has no generation_config.json to merge into the export's", base)
        return None


# what a sampling base model's generation_config.json decides for the export
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty")


def upload_dir(local: str, target: str) -> None:
    """Copy a local directory tree to a local path or an object-store URI, replacing it.

    Not atomic: an object store cannot rename a folder, and a 15 GB model takes minutes to
    write. So INCOMPLETE_FILE is written first, before the old content goes, and removed after
    the last file is in; serving (serve/fetch.py) refuses, or with serve.wait_for_model_s waits
    for, an export or a folder of one (adapter/, base/) while it is there. It marks the unfinished
    export rather than the finished one: exports from before it, and models soulray did not
    write (a base model on a volume), have no marker and are served as they are.
    """
    marker = storage.join(target, INCOMPLETE_FILE)
    storage.write_text(marker, "soulray train is writing this export: complete once this is gone\n")
    storage.clear_dir(target, keep=INCOMPLETE_FILE)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            storage.write_bytes(
                storage.join(target, *path.relative_to(local).parts), path.read_bytes()
            )
    storage.delete_file(marker)
