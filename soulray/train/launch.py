"""`soulray train`: the driver. Builds the Ray datasets and the TorchTrainer, runs the loop.

The only module that knows about TorchTrainer, ScalingConfig and RunConfig. Re-running with the
same train.run_name and train.storage_path resumes from the run's latest checkpoint; a worker
that crashes is restarted from it up to train.max_failures times.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from soulray import storage
from soulray.config import CONFIG_FILE, INCOMPLETE_FILE, Config, TrainConfig
from soulray.data.manifest import (
    TRAINED_TOKENIZER,
    data_fingerprint,
    read_manifest,
)
from soulray.train.feed import RankPlan, amplification_warning, plan_reads, rows_per_rank

log = logging.getLogger("soulray.train")

# The process group's collectives wait this long: rank 0's final export of a 7-8B model (build
# on CPU, load, merge, ~15 GB written) runs while the other ranks wait at a barrier, and NCCL's
# default under torchrun (10 min) would end them, and rank 0 with them, mid-write.
PROCESS_GROUP_TIMEOUT_S = 3600


def process_group_backend(t: TrainConfig) -> str:
    """NCCL for CUDA tensors; with train.cpu_offload the sharded gradients live on the CPU and
    their norm is all-reduced there, which needs gloo beside NCCL."""
    if not t.use_gpu:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if t.cpu_offload else "nccl"


SHARED_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "ceph",
    "glusterfs",
    "beegfs",
    "gpfs",
    "fuse.gcsfuse",
    "fuse.s3fs",
    "fuse.mountpoint-s3",
    "fuse.juicefs",
    "virtiofs",
    "9p",
)


def is_shared_path(path: str) -> bool:
    """An object-store URI, or a local path on a network filesystem (per /proc/mounts)."""
    if storage.is_remote(path):
        return True
    path = storage.normalize(path)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    best, fstype = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if path == parts[1] or path.startswith(parts[1].rstrip("/") + "/"):
            best, fstype = parts[1], parts[2]
    return fstype in SHARED_FILESYSTEMS


def check_storage(cfg: Config) -> None:
    """On a cluster spanning hosts, the checkpoints, the export and the prepared data must be
    on storage every node can reach (counted over the nodes alive now: a cluster that scales
    up from one host is not caught here)."""
    hosts = cluster_hosts()
    t = cfg.train
    for key, path in (
        ("train.storage_path", t.storage_path),
        ("train.export_dir", t.export_dir),
        ("train.data_dir", cfg.train_data_dir),
    ):
        problem = storage_problem(path, hosts, key)
        if problem:
            raise ValueError(problem)


def cluster_hosts() -> int:
    """The hosts of the current Ray cluster's alive nodes (nodes on one host share its disks);
    1 before Ray is started: Ray Data then starts a local one."""
    import ray

    if not ray.is_initialized():
        return 1
    return len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def check_before_workers(cfg: Config, data_dir: str, torchrun: bool = False) -> Config:
    """What would fail, or go wrong, in every worker, checked once where the run starts (both
    launchers; `torchrun`: the torchrun one); returns the config with what a resume keeps from
    its checkpoint."""
    from soulray.data.pipeline import check_local_model_path

    check_export_dir(cfg)
    # prepare's refusal, not transformers' "Repo id" traceback in every worker
    check_local_model_path(cfg, weights=True)
    check_model_dir(cfg)
    check_cpu_attention(cfg)
    check_data_tokenizer(cfg, data_dir)
    check_data_shape(cfg, data_dir)
    if cfg.model.name_or_path or cfg.lora.enabled:
        from soulray.train.checkpoint import build_generation_config
        from soulray.train.data import load_run_tokenizer
        from soulray.train.model import check_lora_on_meta, check_model_vocab

        tokenizer = load_run_tokenizer(data_dir, cfg.model.trust_remote_code)
        check_model_vocab(cfg, tokenizer)
        # the export's generation config, from the base model's: a bad one failed at export
        build_generation_config(tokenizer, None, cfg.model.name_or_path)
        if cfg.lora.enabled:
            check_lora_on_meta(cfg, tokenizer)
    check_launcher(cfg, torchrun)
    check_not_past_steps(cfg)
    check_warmup(cfg.train)
    return check_resume_config(cfg)


# What AutoModelForCausalLM.from_pretrained reads from a local model directory
MODEL_CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(cfg: Config) -> None:
    """A local model directory without its config.json or weights (a copy cut short, the
    tokenizer alone) failed in every worker after Ray had started, with transformers' error
    and the advice to run the same command again."""
    path = cfg.model.name_or_path
    if path is None or not Path(path).expanduser().is_dir():
        return  # the tiny model, or a hub id (a missing local path: check_local_model_path)
    folder = Path(path).expanduser()
    if not (folder / MODEL_CONFIG_FILE).is_file():
        raise ValueError(
            f"model.name_or_path {path} has no {MODEL_CONFIG_FILE}: it must be a whole "
            "Hugging Face model directory (config.json, weights, tokenizer); copy the model "
            "again or point model.name_or_path at it"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"model.name_or_path {path} holds no weights (one of {', '.join(WEIGHT_FILES)}): "
            "copy the model's weight files into it, or point model.name_or_path at a directory "
            "that has them"
        )


def check_warmup(t: TrainConfig) -> None:
    """A warmup longer than the run (the default 10 steps with train.steps=5) never reaches
    train.lr: the whole run trains at a fraction of the rate asked for."""
    if t.warmup_steps > t.steps:
        log.warning(
            "warning: train.warmup_steps=%d is more than train.steps=%d: the learning rate "
            "rises for the whole run and peaks at %.2g of train.lr=%g; lower "
            "train.warmup_steps",
            t.warmup_steps,
            t.steps,
            t.steps / t.warmup_steps,
            t.lr,
        )


def check_cpu_attention(cfg: Config) -> None:
    """The FlashAttention kernels run on CUDA only: on a CPU run every worker refused them,
    under Ray once per allowed restart (4 times with 2 workers, a minute on the quickstart)."""
    attn = cfg.model.attn_implementation
    if not cfg.train.use_gpu and attn in ("flash_attention_3", "flash_attention_2", "varlen"):
        raise ValueError(
            f"model.attn_implementation={attn} needs a CUDA GPU and this run trains on the CPU "
            "(train.use_gpu=false); use 'auto' or 'sdpa', or set train.use_gpu=true"
        )


def check_data_shape(cfg: Config, data_dir: str) -> None:
    """data.seq_len and data.mode must be what the data was prepared with: the rows are what
    they are, and the run would record (and resume-check, and size its estimates by) another."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return  # not prepare's output: load_run_tokenizer says so
    for key, ours in (("seq_len", cfg.data.seq_len), ("mode", cfg.data.mode)):
        theirs = manifest.get(key)
        if theirs is not None and theirs != ours:
            raise ValueError(
                f"train.data_dir {data_dir} was prepared with data.{key}={theirs}, but this run "
                f"has data.{key}={ours}; set data.{key}={theirs}, or prepare again with {ours}"
            )
    check_data_rendering(cfg, data_dir)


def check_data_rendering(cfg: Config, data_dir: str) -> None:
    """The export tells serving how the rows were rendered (soulray.yaml, serving.json) from
    this run's data.strategy_tags, data.strategies and data.system_prompt: values other than
    prepare's (in the data's config.yaml) would serve a system prompt the model never saw, or
    leave its "[Strategy] " tags in the replies."""
    from soulray.config import ConfigError, parse_config

    path = storage.join(data_dir, "config.yaml")
    if not storage.exists(path):
        return  # not prepare's output: load_run_tokenizer says so
    try:
        prepared = parse_config(storage.read_text(path), path).data
    except ConfigError:
        return  # written by another soulray version: nothing to compare against

    def rendered(data: Any) -> dict[str, Any]:
        tags = {"strategies.taxonomy": data.strategies.taxonomy} if prepared.strategy_tags else {}
        return {"strategy_tags": data.strategy_tags, "system_prompt": data.system_prompt, **tags}

    ours = rendered(cfg.data)
    for key, theirs in rendered(prepared).items():
        if theirs != ours[key]:
            raise ValueError(
                f"train.data_dir {data_dir} was prepared with data.{key}={theirs!r}, but this "
                f"run has data.{key}={ours[key]!r}; the export records this run's value for "
                f"serving, which would then not match training. Set data.{key} as in {path}, "
                "or prepare again with this config"
            )


def check_export_dir(cfg: Config) -> None:
    """An export into the model it trains from would overwrite the base weights (and a LoRA
    adapter would then point at the merged model, applying itself twice). The export replaces
    everything in train.export_dir, so a folder holding the checkpoints, the prepared data
    (train.export_dir=runs/quickstart) or the model (train.export_dir=/models) would delete
    them."""
    export = storage.normalize(cfg.train.export_dir)
    base = cfg.model.name_or_path
    if base and export == storage.normalize(base):
        raise ValueError(
            f"train.export_dir {cfg.train.export_dir} is model.name_or_path: the export would "
            "overwrite the model this run trains from; export to another directory"
        )
    inside = [
        ("train.storage_path", cfg.train.storage_path),
        ("train.data_dir", cfg.train_data_dir),
    ]
    # a local model in a folder of the export (a hub id is no folder of it)
    for key in ("model.name_or_path", "model.tokenizer"):
        path = getattr(cfg.model, key.split(".")[1])
        if path and Path(path).expanduser().exists():
            inside.append((key, path))
    # a corpus named by path (a glob or a folder above the export is no file of it)
    inside += [("data.inputs", i) for i in cfg.data.inputs if not set(storage.GLOB_CHARS) & set(i)]
    for key, path in inside:
        inner = storage.normalize(path)
        if inner == export or inner.startswith(export.rstrip("/") + "/"):
            raise ValueError(
                f"train.export_dir {cfg.train.export_dir} holds {key} {path}: the export "
                "replaces everything in its directory and would delete it; export to a "
                f"directory of its own, e.g. train.export_dir={export.rstrip('/')}/model"
            )
    others = foreign_files(export)
    if others:
        raise ValueError(
            f"train.export_dir {cfg.train.export_dir} holds files that are no soulray export "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): the export "
            "replaces everything in its directory and would delete them; export to an empty "
            f"or new directory, e.g. train.export_dir={export.rstrip('/')}/model"
        )


# what marks a directory as a soulray export (written first: _INCOMPLETE; last: the others)
EXPORT_MARKERS = (CONFIG_FILE, "serving.json", INCOMPLETE_FILE)


def foreign_files(export: str) -> list[str]:
    """The files of a non-empty train.export_dir that is no earlier soulray export (none of
    EXPORT_MARKERS at its top), relative to it; [] for a missing or empty one, or an export."""
    if not storage.exists(export):
        return []
    files = storage.list_files(export)
    top = {f[len(export.rstrip("/")) + 1 :].split("/")[0] for f in files}
    if not files or top & set(EXPORT_MARKERS):
        return []
    return sorted(f[len(export.rstrip("/")) + 1 :] for f in files)


def check_not_past_steps(cfg: Config) -> None:
    """A rerun with train.steps below what the run has trained is refused before any worker
    starts (a worker would refuse too, once per allowed failure)."""
    from soulray.train.loop import past_steps

    done = latest_checkpoint_step(cfg)
    if done > cfg.train.steps:
        raise ValueError(past_steps(done, cfg.train.steps))


# Ray Train's record of the checkpoints it registered, and so resumes from (its latest)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


LAUNCHER_FILE = "soulray_launcher.json"  # in the run folder: which launcher started the run


def mark_launcher(cfg: Config, torchrun: bool) -> None:
    """Record which launcher started the run (once, when it starts), for check_launcher."""
    from soulray.train.checkpoint import run_dir

    marker = storage.join(run_dir(cfg.train), LAUNCHER_FILE)
    if not storage.exists(marker):
        launcher = "torchrun" if torchrun else "ray"
        storage.write_text(marker, json.dumps({"launcher": launcher}) + "\n")


def check_launcher(cfg: Config, torchrun: bool) -> None:
    """A run resumes under the launcher that wrote it. Ray Train resumes only from the
    checkpoints in its own record (RAY_SNAPSHOT), which torchrun neither writes nor updates: a
    torchrun run rerun with `soulray train` started again from step 0 (rewriting metrics.jsonl)
    while the summary said it resumed, and torchrun went on from a Ray run's latest folder,
    leaving Ray's record behind (and deleting checkpoints it lists). The run's LAUNCHER_FILE
    says which started it; a run from before it is told by Ray's record (a Ray run killed before
    its first checkpoint was registered has none, and is then taken for torchrun's)."""
    from soulray.train.checkpoint import CHECKPOINT_RE, STATE_FILE, run_dir

    run = run_dir(cfg.train)
    if not storage.exists(run):
        return
    files = storage.list_files(run)
    marker = storage.join(run, LAUNCHER_FILE)
    if storage.exists(marker):
        by_ray = json.loads(storage.read_text(marker)).get("launcher") == "ray"
    else:
        by_ray = any(f.endswith(f"/{RAY_SNAPSHOT}") for f in files)
    complete = (f for f in files if f.endswith(f"/{STATE_FILE}"))
    steps = [int(m.group(1)) for f in complete if (m := CHECKPOINT_RE.search(f))]
    if torchrun and by_ray:
        raise ValueError(
            f"{run} is a run of `soulray train`, whose checkpoints Ray Train resumes from its "
            f"own record ({RAY_SNAPSHOT}), which torchrun does not keep: resume it with "
            "`soulray train`, or set a new train.run_name"
        )
    if not torchrun and not by_ray and steps:
        raise ValueError(
            f"{run} holds checkpoints (latest step {max(steps)}) that Ray Train has no record "
            f"of ({RAY_SNAPSHOT}; the torchrun launcher's), so `soulray train` would start "
            "it again from step 0: resume it with `torchrun ... -m soulray.train.torchrun`, or "
            "set a new train.run_name"
        )


def latest_checkpoint_step(cfg: Config) -> int:
    """The step a rerun resumes from (0: none; steps logged after it are retrained): under Ray,
    the latest checkpoint Ray Train registered (one written while the run was killed may be on
    disk and not registered); under torchrun, the latest complete one (a killed worker's
    half-written checkpoint has no state file)."""
    from soulray.train.checkpoint import CHECKPOINT_RE, STATE_FILE, run_dir

    run = run_dir(cfg.train)
    if not storage.exists(run):
        return 0
    files = storage.list_files(run)
    snapshot = [f for f in files if f.endswith(f"/{RAY_SNAPSHOT}")]
    if snapshot:
        try:
            latest = json.loads(storage.read_text(snapshot[0]))["latest_checkpoint_result"]
            name = latest["checkpoint_dir_name"] if latest else None
        except (ValueError, KeyError, TypeError):  # another Ray version's layout: as torchrun
            pass
        else:
            return int(m.group(1)) if name and (m := CHECKPOINT_RE.search(f"/{name}/")) else 0
    complete = (f for f in files if f.endswith(f"/{STATE_FILE}"))
    return max((int(m.group(1)) for f in complete if (m := CHECKPOINT_RE.search(f))), default=0)


# What a resumed run cannot change: the checkpoint's shapes (model, LoRA), and what its data
# position counts in (micro-batches of rows of seq_len tokens).
RESUME_FIXED = {
    "model.name_or_path": "the checkpoint holds that model's weights",
    "model.tokenizer": "the checkpoint's embeddings are that tokenizer's",
    "model.tiny": "the checkpoint holds a tiny model of that shape",
    "lora.enabled": "the checkpoint holds adapters (or none)",
    "lora.r": "the checkpoint holds adapters of that rank",
    "lora.alpha": "the adapters' scale is part of what they learned",
    "lora.target_modules": "the checkpoint holds adapters on those modules",
    "data.seq_len": "the data position counts rows of that length",
    "data.mode": "the data position counts rows of that layout",
    "train.micro_batch_size": "the data position counts micro-batches of that size",
    "train.grad_accum": "the data position counts micro-batches per step",
}
# What it keeps from the checkpoint whatever the config says: the optimizer and schedule state.
RESUME_KEPT = ("train.lr", "train.weight_decay", "train.betas")
# changeable on resume, but they reshape the lr schedule (lr_factor reads them at every step)
RESUME_RESHAPED = ("train.steps", "train.warmup_steps", "train.min_lr_ratio")
# changeable on resume, but they reorder the epoch the saved data position counts into
RESUME_REORDERED = ("train.seed", "train.shuffle_window_rows")
# what a resume with another value of each is warned of
RESUME_WARNED = {
    **dict.fromkeys(
        RESUME_RESHAPED,
        "the learning-rate schedule follows the new value from the resumed step on, so the lr "
        "there changes at once (a longer run stretches the decay: the lr rises again)",
    ),
    **dict.fromkeys(
        RESUME_REORDERED,
        "the rows are shuffled in another order, so the saved data position (epoch and "
        "micro-batch) skips other rows: the rest of this epoch trains some rows twice and some "
        "not at all. Put it back, or set a new train.run_name",
    ),
}


def saved_run_config(cfg: Config, quiet: bool = False) -> tuple[Config, str] | None:
    """The config saved beside the run's latest checkpoint (CONFIG_FILE) and its path; None
    without one, or (said unless `quiet`) when another soulray version wrote it."""
    from soulray.config import CONFIG_FILE, ConfigError, parse_config
    from soulray.train.checkpoint import run_dir

    run = run_dir(cfg.train)
    if not storage.exists(run):
        return None
    saved = sorted(
        f for f in storage.list_files(run) if f.endswith(f"/{CONFIG_FILE}") and "/checkpoint_" in f
    )
    if not saved:
        return None
    try:
        return parse_config(storage.read_text(saved[-1]), saved[-1]), saved[-1]
    except ConfigError as e:  # written by another soulray version: nothing to compare against
        if not quiet:
            log.warning("train: not checking the resume against %s: %s", saved[-1], e)
        return None


def _value(c: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    part = getattr(getattr(c, section), name)
    return part.model_dump(mode="json") if isinstance(part, BaseModel) else part


def refuse_resume_changes(cfg: Config, old: Config | None = None) -> None:
    """Refuse what a resumed run cannot change (RESUME_FIXED) against the run's saved config.
    `soulray pipeline` asks before preparing again: a data.seq_len that train then refused had
    already cost the prepared data (and hours of prepare on a big corpus, twice)."""
    if old is None:
        saved = saved_run_config(cfg, quiet=True)
        if saved is None:
            return
        old = saved[0]
    for key, why in RESUME_FIXED.items():
        if key == "model.tiny" and cfg.model.name_or_path:
            continue  # a pretrained model: the tiny shape is not used
        if key.startswith("lora.") and key != "lora.enabled" and not cfg.lora.enabled:
            continue
        if _value(old, key) != _value(cfg, key):
            raise ValueError(
                f"train.run_name={cfg.train.run_name} has checkpoints made with another {key} "
                f"({why}): resuming cannot change it. Set a new train.run_name to train with "
                f"this config, or put {key} back (was: {_value(old, key)})"
            )


def check_resume_config(cfg: Config) -> Config:
    """Against the config saved beside the run's latest checkpoint (CONFIG_FILE):
    refuse what a resumed run cannot change, and warn of what it keeps from the checkpoint.
    Returns the config with what it keeps set to the checkpoint's values, so the config saved
    with later checkpoints and the export records what trained."""
    saved = saved_run_config(cfg)
    if saved is None:
        return cfg
    old, saved_path = saved
    refuse_resume_changes(cfg, old)
    name = cfg.train.run_name

    def data(c: Config) -> str:
        return storage.normalize(c.train_data_dir)

    check_resume_tokenizer(cfg, saved_path, data(cfg))
    if data(old) != data(cfg):
        log.warning(
            "train: resuming %s on train.data_dir=%s, but its checkpoints trained on %s: the "
            "saved data position (epoch and micro-batch) now counts rows of other data",
            name,
            data(cfg),
            data(old),
        )
    elif prepared_again(saved_path, data(cfg)):
        log.warning(
            "train: resuming %s on train.data_dir=%s, which was prepared again since its "
            "checkpoints trained (its manifest differs): the saved data position (epoch and "
            "micro-batch) now counts rows of other data. Set a new train.run_name to train "
            "on it from the start",
            name,
            data(cfg),
        )
    for key, why in RESUME_WARNED.items():
        if _value(old, key) != _value(cfg, key):
            log.warning(
                "train: resuming %s with %s=%s (was %s): %s",
                name,
                key,
                _value(cfg, key),
                _value(old, key),
                why,
            )
    for key in RESUME_KEPT:
        if _value(old, key) != _value(cfg, key):
            log.warning(
                "train: resuming %s, which keeps %s=%s from its checkpoint (the optimizer and "
                "schedule state); this config's %s is not applied (a new run_name would be)",
                name,
                key,
                _value(old, key),
                _value(cfg, key),
            )
    return with_kept(cfg, old)


def check_resume_tokenizer(cfg: Config, saved_config: str, data_dir: str) -> None:
    """A run resumed on data whose tokenizer prepare trained on the corpus again (1,789 of 2,048
    ids moved) trained, without a word, embeddings learned for other tokens. Its hash covers
    all of the tokenizer's files, so only a corpus-trained one is compared (a configured one's
    vocabulary is checked against the model's). Checkpoints written before their state recorded
    the tokenizer are not checked."""
    tokenizer = (read_manifest(data_dir) or {}).get("tokenizer", {})
    if tokenizer.get("source") != TRAINED_TOKENIZER:
        return  # a configured tokenizer: check_data_tokenizer compares its vocabulary
    trained, now = saved_state(saved_config).get("tokenizer_hash"), tokenizer.get("hash")
    if trained is not None and now is not None and trained != now:
        raise ValueError(
            f"train.run_name={cfg.train.run_name} has checkpoints trained on token ids of another "
            f"tokenizer than the data in {data_dir} has (it was prepared again with a new "
            "one): resuming would train their embeddings on other tokens. Set a new "
            "train.run_name to train on this data, or prepare with the run's tokenizer again"
        )


def prepared_again(saved_config: str, data_dir: str) -> bool:
    """Whether the data a checkpoint trained on (the fingerprint in its state file, beside
    `saved_config`) differs from what `data_dir` holds now."""
    trained = saved_state(saved_config).get("data_fingerprint")
    now = data_fingerprint(data_dir)
    return trained is not None and now is not None and trained != now


def saved_state(saved_config: str) -> dict[str, Any]:
    """The state file beside a checkpoint's saved config ({} without one)."""
    from soulray.train.checkpoint import STATE_FILE

    state = storage.join(saved_config.rsplit("/", 1)[0], STATE_FILE)
    return json.loads(storage.read_text(state)) if storage.exists(state) else {}


def with_kept(cfg: Config, trained: Config) -> Config:
    """`cfg` with what a resume keeps from its checkpoint (RESUME_KEPT) set to `trained`'s."""
    kept = {name: getattr(trained.train, name) for name in (k.split(".")[1] for k in RESUME_KEPT)}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=kept)})


def check_data_tokenizer(cfg: Config, data_dir: str) -> None:
    """The prepared token ids must be the model's: training reads the tokenizer saved with the
    data but builds the model from model.name_or_path, so data prepared for another model (or
    with the tokenizer trained on the corpus) would train on ids that mean other tokens."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return  # not prepare's output: load_run_tokenizer says so
    source = manifest.get("tokenizer", {}).get("source")
    wanted = cfg.model.tokenizer_path
    if source is None or wanted is None or source == wanted:
        return  # no model configured: the tiny model is built for the data's tokenizer
    fix = (
        f"run `soulray prepare` with this config's model into a new data.output_dir, or set "
        f"train.data_dir to data prepared with {wanted}"
    )
    if source == TRAINED_TOKENIZER:
        raise ValueError(
            f"train.data_dir {data_dir} was prepared with a tokenizer trained on the corpus, "
            f"but this run trains {wanted}, whose token ids differ; {fix}"
        )
    from soulray.data.pipeline import not_a_model
    from soulray.data.tokenizer import load_tokenizer
    from soulray.train.data import load_run_tokenizer

    trust = cfg.model.trust_remote_code
    ours = load_run_tokenizer(data_dir, trust)  # the same tokenizer at another path is fine
    try:
        theirs = load_tokenizer(wanted, trust)
    except OSError as e:  # a hub id out of reach: named by its key, not transformers' words
        if Path(wanted).expanduser().exists():
            raise
        raise ValueError(not_a_model(cfg, wanted, e)) from None
    if ours.get_vocab() != theirs.get_vocab():
        raise ValueError(
            f"train.data_dir {data_dir} was prepared with the tokenizer of {source}, whose "
            f"vocabulary differs from {wanted}'s (the model trained here); {fix}"
        )


STORAGE_WHY = {
    "train.storage_path": "each worker would write its checkpoint shards to its own disk and a "
    "restarted worker could not read them back",
    "train.export_dir": "rank 0 writes the export on whichever node it runs, not where you "
    "look for it",
    "train.data_dir": "workers on the other hosts would not find the prepared rows",
    "data.output_dir": "each render actor would write its shards to its own host's disk, and "
    "the manifest and training would not see them",
}


def storage_problem(path: str, hosts: int, key: str = "train.storage_path") -> str | None:
    """Why `path` (the setting `key`) cannot serve a cluster on `hosts` hosts (None if it can).
    Nodes on one host share its disks, so a single-host cluster may use a local path."""
    if hosts <= 1 or is_shared_path(path):
        return None
    return (
        f"{key}={path} is a local directory, but the Ray cluster spans {hosts} hosts: "
        f"{STORAGE_WHY[key]}. Use shared storage: an s3:// or gs:// URI, or a path on an NFS "
        "mount present on every node"
    )


def worker_resources(cfg: Config, cluster_cpus: float) -> dict[str, float] | None:
    """Resources per training worker. CPU training leaves one CPU free for Ray Data, which
    reads the rows while the workers train (otherwise its read tasks could never start).

    Unset, a CPU worker takes 1 CPU, or an equal share of what the cluster has now less one
    (2 workers on a 2-CPU machine: 0.5 each). Set, `train.resources_per_worker` is asked as is:
    an autoscaling cluster (KubeRay with minReplicas 0) may have no CPUs yet and grows to fit."""
    t = cfg.train
    if t.resources_per_worker:
        resources = dict(t.resources_per_worker)
        need = resources.get("CPU", 1.0) * t.num_workers + (0.0 if t.use_gpu else 1.0)
        if cluster_cpus < need:
            log.warning(
                "train: %d worker(s) with %s each%s need %g CPUs and the cluster has %g now: "
                "Ray waits for the autoscaler to add nodes (on a fixed cluster nothing will "
                "start; lower train.num_workers or train.resources_per_worker)",
                t.num_workers,
                resources,
                "" if t.use_gpu else " and Ray Data's reader",
                need,
                cluster_cpus,
            )
        return resources
    if t.use_gpu:
        return None  # Ray's default (1 CPU + 1 GPU); GPU nodes have CPUs to spare
    share = min(1.0, (cluster_cpus - 1) / t.num_workers)
    if share <= 0:
        raise ValueError(
            f"the cluster has {cluster_cpus:g} CPU(s) now: too few for {t.num_workers} CPU "
            "training worker(s) plus 1 for Ray Data to read the rows. On an autoscaling cluster "
            "(KubeRay, minReplicas 0) set train.resources_per_worker='{CPU: 1}' so Ray waits for "
            "nodes; otherwise add CPUs or lower train.num_workers"
        )
    return {"CPU": share}


def check_gpus(cfg: Config, cluster_gpus: float) -> None:
    """Warn when train.use_gpu asks for more GPUs than the cluster has now: Ray waits for them
    (an autoscaler may add them), and on a fixed cluster the run ends minutes later, after its
    restarts, with Ray's start-up timeout instead of the reason."""
    t = cfg.train
    need = t.resources_per_worker.get("GPU", 1.0) * t.num_workers
    if t.use_gpu and cluster_gpus < need:
        log.warning(
            "train: %d worker(s) need %g GPU(s) and the cluster has %g now: Ray waits for the "
            "autoscaler to add GPU nodes (on a fixed cluster nothing will start; lower "
            "train.num_workers, or set train.use_gpu=false to train on CPUs)",
            t.num_workers,
            need,
            cluster_gpus,
        )


CACHE_BYTES = 2**30  # splits up to this size are read once and kept in the object store


def build_datasets(data_dir: str, world: int, micro_batch: int = 1) -> dict[str, Any]:
    """One Ray dataset per rank and split, reading only that rank's files (see feed.py); with
    a world size the layout cannot prune for, all files filtered to row_key % world == rank.

    A small split is materialized once here, so later epochs iterate the object store instead
    of re-running the Parquet read; a large one streams from storage every epoch.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    # Progress bars from every worker's reader would garble the training log.
    context.enable_progress_bars = False
    # Materializing must keep the file order too (read tasks finish in any order), or Ray and
    # torchrun would train on the same rows in different orders.
    context.execution_options.preserve_order = True
    train_plans = plan_reads(data_dir, "train", world)
    check_rows_per_rank(data_dir, train_plans, micro_batch)
    warning = amplification_warning(data_dir, world)
    if warning:
        log.warning("warning: %s", warning)
    datasets = {}
    for split, plans in (("train", train_plans), ("val", plan_reads(data_dir, "val", world))):
        split_bytes = plans[0].bytes if plans[0].filtered else sum(p.bytes for p in plans)
        cache = split_bytes <= CACHE_BYTES
        for plan in plans:
            if plan.files:
                datasets[f"{split}_{plan.rank}"] = rank_dataset(plan, cache)
    return datasets


def rank_dataset(plan: RankPlan, cache: bool) -> Any:
    """The Ray dataset of one rank's rows of a split: its files, filtered only in fallback."""
    import ray.data

    fs, _ = storage.resolve(plan.files[0])
    ds = ray.data.read_parquet(
        [storage.resolve(f)[1] for f in plan.files],
        filesystem=fs,
        columns=plan.columns,
        partitioning=None,  # part=<k> is a layout, not a column
    )
    if plan.filtered:
        ds = ds.filter(expr=rank_filter(plan.world, plan.rank))
    return ds.materialize() if cache else ds


def rank_filter(world_size: int, rank: int) -> Any:
    """The Ray Data filter expression selecting one rank's rows (the fallback layout)."""
    from ray.data.expressions import col

    return (col("row_key") % world_size) == rank


def check_rows_per_rank(
    data_dir: str, plans: list[RankPlan], micro_batch: int = 1, quiet: bool = False
) -> None:
    """Refuse a layout that leaves a rank without rows; say how many each has, and warn when a
    micro-batch is more than a rank's rows (`quiet`: refuse only, for torchrun's other ranks)."""
    if not any(p.files for p in plans):
        raise ValueError(
            f"no prepared training data in {data_dir}/train: run `soulray prepare` first, or "
            "set train.data_dir to its data.output_dir"
        )
    counts = rows_per_rank(plans)
    empty = [p.rank for p, n in zip(plans, counts, strict=True) if n == 0]
    if empty:
        raise ValueError(
            f"ranks {empty} would get no training rows ({sum(counts)} packed rows for "
            f"{len(plans)} workers); prepare more data or lower train.num_workers"
        )
    if quiet:
        return
    log.info("train rows per rank: %s", counts)
    if min(counts) < micro_batch:
        log.warning(
            "warning: train.micro_batch_size=%d is more than the %d rows a rank has: a "
            "micro-batch is then a whole epoch of those rows, smaller than asked",
            micro_batch,
            min(counts),
        )


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths: Ray Train runs workers in another working directory (where a local
    model.name_or_path such as ./my-model was taken for a hub id, once per restart)."""
    t = cfg.train
    train = t.model_copy(
        update={
            "storage_path": storage.normalize(t.storage_path),
            "export_dir": storage.normalize(t.export_dir),
            "data_dir": storage.normalize(cfg.train_data_dir),
        }
    )
    m = cfg.model
    model = m.model_copy(
        update={"name_or_path": local_model(m.name_or_path), "tokenizer": local_model(m.tokenizer)}
    )
    return cfg.model_copy(update={"train": train, "model": model})


def local_model(path: str | None) -> str | None:
    """A local model path (prepare's rule: it starts with /, ./, ../ or ~; or it is a folder
    here, as transformers reads "base" when ./base exists) made absolute: the workers run in
    another directory, where "base" was looked up on the hub. A hub id or None as is."""
    if path is None:
        return path
    if not path.startswith(("/", "./", "../", "~")) and not Path(path).is_dir():
        return path
    return storage.normalize(path)


def check_training(cfg: Config) -> Config:
    """What needs no cluster, checked before Ray starts (`soulray train` said a missing data
    directory after ~20 s of Ray start-up); returns the config run_train(checked=True) takes."""
    cfg = resolve_paths(cfg)
    t = cfg.train
    assert t.data_dir is not None
    cfg = check_before_workers(cfg, t.data_dir)
    if t.use_gpu:  # refused here, not by every worker after the cluster started
        from soulray.train.model import flash_dtype

        flash_dtype(cfg.model.attn_implementation, t.dtype == "float32")
    plans = plan_reads(t.data_dir, "train", t.num_workers)
    check_rows_per_rank(t.data_dir, plans, t.micro_batch_size, quiet=True)  # build_datasets says
    return cfg


def run_train(cfg: Config, checked: bool = False) -> Any:
    """Fit on the current Ray cluster; return Ray Train's Result. `checked`: `cfg` is what
    check_training returned (the CLI runs it before Ray starts)."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    if not checked:
        cfg = check_training(cfg)
    t = cfg.train
    assert t.data_dir is not None
    check_storage(cfg)
    datasets = build_datasets(t.data_dir, t.num_workers, t.micro_batch_size)
    resources = worker_resources(cfg, ray.cluster_resources().get("CPU", 0.0))
    check_gpus(cfg, ray.cluster_resources().get("GPU", 0.0))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "val_ranks": [k for k in datasets if k.startswith("val_")],
        },
        torch_config=TorchConfig(
            backend=process_group_backend(t), timeout_s=PROCESS_GROUP_TIMEOUT_S
        ),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=t.run_name,
            storage_path=t.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures(t)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    log.info(
        "training %s with %d worker(s): %d steps, checkpoints in %s/%s",
        t.run_name,
        t.num_workers,
        t.steps,
        t.storage_path,
        t.run_name,
    )
    mark_launcher(cfg, torchrun=False)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        stopped = training_stopped(e, t)
        if stopped is None:
            raise  # a worker's own ValueError: the CLI shows it as itself
        raise stopped from e
    except (KeyboardInterrupt, SystemExit):  # Ray Train's Ctrl-C handler aborts, then exits
        raise TrainingStopped(interrupted(cfg)) from None
    step = (result.metrics or {}).get("step")
    if step is not None and step < t.steps:  # aborted (Ctrl-C) and returned: the loop runs on
        raise TrainingStopped(interrupted(cfg))
    return result


def interrupted(cfg: Config) -> str:
    """What a run stopped by Ctrl-C (or SIGTERM) left and how to go on (it ended in silence)."""
    t = cfg.train
    where = f"{t.storage_path}/{t.run_name}"
    try:
        step = latest_checkpoint_step(cfg)
    except OSError:  # storage out of reach now: say what holds anyway
        return (
            "training stopped (Ctrl-C or SIGTERM): run the same command again to resume from "
            + where
        )
    if step == 0:
        return f"training stopped (Ctrl-C or SIGTERM) before its first checkpoint in {where}"
    return (
        f"training stopped (Ctrl-C or SIGTERM); its latest checkpoint is step {step} in {where}: "
        "run the same command again to resume from it"
    )


class TrainingStopped(ValueError):
    """Ray Train gave up on a run; the message says why and how to go on."""


def training_stopped(e: Exception, t: TrainConfig) -> TrainingStopped | None:
    """A run Ray Train gave up on (a worker failed more often than train.max_failures allows,
    or its controller failed) as one error that names the failures and says a re-run resumes;
    None when a worker raised a ValueError (bad data or config), which is the error to show."""
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        if any(_own_error(f) for f in failures.values()):
            return None
        why = "; ".join(f"worker {rank}: {_first_line(f)}" for rank, f in sorted(failures.items()))
    else:
        why = _first_line(getattr(e, "controller_failure", None) or e)
    return TrainingStopped(
        f"training stopped (train.max_failures={max_failures(t)} restarts): {why}. "
        f"Its checkpoints stay in {t.storage_path}/{t.run_name}: run the same command again to "
        "resume from the latest (or raise train.max_failures)"
    )


def _own_error(e: BaseException) -> bool:
    """A worker's error the CLI shows as itself (cli.user_error): a plain ValueError, or one of
    soulray's own."""
    return type(e) is ValueError or (
        isinstance(e, ValueError) and type(e).__module__.startswith("soulray")
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def max_failures(t: TrainConfig) -> int:
    """train.max_failures, or by default: restart a multi-worker run from its last checkpoint
    (up to 3 times), since one of many machines failing is routine; a single worker fails alone."""
    if t.max_failures is not None:
        return t.max_failures
    return 3 if t.num_workers > 1 else 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry: wire the loop to Ray's datasets, checkpoints and reports."""
    import ray.train
    import ray.train.torch

    from soulray.train.checkpoint import checkpoint_name, run_dir
    from soulray.train.data import load_run_tokenizer
    from soulray.train.feed import build_source, ray_chunks
    from soulray.train.loop import Runtime, train_loop

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    cfg = Config.model_validate(config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_shard = ray.train.get_dataset_shard(f"train_{rank}")
    # A rank whose partitions hold no val rows still evaluates (with filler batches): every
    # rank must run the same FSDP forwards.
    has_val = f"val_{rank}" in config["val_ranks"]
    val_shard = ray.train.get_dataset_shard(f"val_{rank}") if has_val else None
    train_batches = build_source(
        lambda: ray_chunks(train_shard), t.micro_batch_size, t.shuffle_window_rows, t.seed, rank
    )
    val_batches = (
        build_source(
            lambda: ray_chunks(val_shard) if val_shard else iter(()), t.micro_batch_size, 0, 0, 0
        )
        if config["val_ranks"]
        else None
    )

    def report(metrics: dict[str, Any], ckpt: str | None) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        if ckpt is None:
            ray.train.report(clean)
            return
        checkpoint = ray.train.Checkpoint.from_directory(ckpt)
        ray.train.report(
            clean, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(metrics["step"])
        )
        shutil.rmtree(ckpt, ignore_errors=True)

    def restore() -> str | None:
        """The checkpoint where it is stored: each rank's DCP reader fetches only its shards."""
        checkpoint = ray.train.get_checkpoint()
        return checkpoint_uri(checkpoint) if checkpoint else None

    rt = Runtime(
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        train_batches=train_batches,
        val_batches=val_batches,
        tokenizer=load_run_tokenizer(cfg.train_data_dir, cfg.model.trust_remote_code),
        metrics_path=storage.join(run_dir(t), "metrics.jsonl"),
        restore=restore,
        checkpoint_dir=lambda step: tempfile.mkdtemp(prefix=f"soulray-ckpt-{step}-"),
        report=report,
    )
    train_loop(cfg, rt)


def checkpoint_uri(checkpoint: Any) -> str:
    """A Ray Train checkpoint's location as soulray.storage spells it (path or s3:// gs://)."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if isinstance(fs, pafs.LocalFileSystem) or fs is None:
        return checkpoint.path
    scheme = {"s3": "s3", "gcs": "gs"}.get(fs.type_name)
    if scheme is None:
        raise ValueError(
            f"cannot resume from a checkpoint on a {fs.type_name} filesystem: "
            "train.storage_path must be a local/NFS path, s3:// or gs://"
        )
    return f"{scheme}://{checkpoint.path}"
