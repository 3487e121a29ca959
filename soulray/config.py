"""Typed configuration for every soulray stage.

One tree (`Config`) holds all sections. It is loaded from YAML, then `a.b=value` overrides from the
command line are applied (values parsed as YAML, so `data.inputs='[a.jsonl, b/*.json]'` is a list).
Unknown keys are refused with their dotted name, and the resolved config is written next to every
output so a run can be reproduced from its own directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from soulray.eval.config import EvalConfig
from soulray.synth.config import SynthConfig

# The file names of a checkpoint's and an export's records (torch-free, for serving to read):
CONFIG_FILE = "soulray.yaml"  # the resolved config that wrote it (checkpoint and export)
METRICS_FILE = "metrics.json"  # the export's final training metrics
# In an export while `soulray train` writes it (first in, last out; see train/checkpoint.py
# upload_dir): serving takes no export, nor a folder of one, that holds it
INCOMPLETE_FILE = "_INCOMPLETE"

ESCONV_STRATEGIES = [
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
]

# Spellings seen in the wild (ESConv releases, FailedESConv) mapped onto the taxonomy above.
# Matching is case-insensitive and ignores surrounding brackets and whitespace.
DEFAULT_STRATEGY_ALIASES = {
    "Questions": "Question",
    "Other": "Others",
    "Restatement": "Restatement or Paraphrasing",
    "Paraphrasing": "Restatement or Paraphrasing",
    "Reflection of Feelings": "Reflection of feelings",
    "Approval and Reassurance": "Affirmation and Reassurance",
    "Suggestions": "Providing Suggestions",
}


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A path or a name: an empty one meant the current directory (train.export_dir="" would
# clear it) or an id nothing can match
NonEmpty = Annotated[str, Field(min_length=1)]


class StrategyConfig(Section):
    taxonomy: list[str] = Field(default_factory=lambda: list(ESCONV_STRATEGIES))
    aliases: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_STRATEGY_ALIASES))
    fallback: str = "Others"  # what an unknown strategy name becomes (counted in the manifest)


class DataConfig(Section):
    inputs: list[str] = Field(
        default_factory=list
    )  # files, globs, directories; local or s3:// gs://
    format: Literal["auto", "messages", "sharegpt", "smile", "xtuner", "esconv"] = "auto"
    output_dir: NonEmpty = "runs/data"
    seq_len: int = Field(2048, ge=16)
    mode: Literal["packed", "padded"] = "packed"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    strategy_tags: bool = False  # prefix assistant targets with "[Strategy] "
    strategies: StrategyConfig = Field(default_factory=StrategyConfig)
    system_prompt: str | None = None  # added to conversations that have none
    strict: bool = False  # stop at the first bad record instead of rejecting it
    tokenizer_vocab_size: int = Field(4096, ge=300)  # for the tokenizer trained with no model
    tokenizer_train_conversations: int = Field(20000, ge=1)  # sample size for that training
    pack_block: int = Field(2048, ge=1)  # conversations rendered and packed together
    # a file bigger than this is parsed as byte ranges of whole records by many tasks
    range_bytes: int = Field(4 * 2**20, ge=4096)
    num_workers: int = Field(0, ge=0)  # render/pack actors; 0 = one per CPU in the cluster
    seed: int = 0  # another value draws another train/val split (eval recomputes it alike)


class TinyModelConfig(Section):
    """Shape of the small model built from config when no checkpoint is given."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    # None: the tokenizer's size. Larger pads the embedding table (Qwen2.5's 151,936 rows hold
    # 151,665 tokens), which is how benchmarks give a tiny-built model a real model's shape.
    vocab_size: int | None = Field(None, ge=1)
    hidden_size: int = Field(128, ge=1)
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _check_heads(self) -> TinyModelConfig:
        """A shape attention cannot run failed in every training worker (a torch size
        mismatch, restarted by Ray Train), not when the config was read."""
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % kv:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv} "
                "(each key/value head serves a whole group of query heads): make "
                "num_key_value_heads a divisor of num_attention_heads"
            )
        head_dim = self.hidden_size // heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} / num_attention_heads={heads} gives heads of "
                f"{head_dim} dimensions; rotary embeddings need an even number, 2 or more: make "
                "hidden_size an even multiple of num_attention_heads, e.g. 32 per head"
            )
        return self


class ModelConfig(Section):
    name_or_path: NonEmpty | None = None  # local HF directory or hub id; None = the tiny default
    tokenizer: NonEmpty | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    attn_implementation: Literal[
        "auto", "flash_attention_3", "flash_attention_2", "varlen", "sdpa", "eager"
    ] = "auto"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.name_or_path


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainConfig(Section):
    run_name: NonEmpty = "soulray"
    storage_path: NonEmpty = "runs/checkpoints"  # Ray Train storage: local dir, NFS, or s3:// gs://
    data_dir: NonEmpty | None = None  # prepared data; defaults to data.output_dir
    export_dir: NonEmpty = "runs/model"  # the final Hugging Face model
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    # a negative amount crashed Ray's raylet and ended as restarts said to be resumable
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    steps: int = Field(100, ge=1)  # optimizer steps
    micro_batch_size: int = Field(1, ge=1)  # packed rows per worker per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    # AdamW's decay rates, each in [0, 1): torch refused others in every worker, after retries
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, gt=0)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0)  # 0 = only at the end
    eval_batches: int = Field(0, ge=0)  # 0 = the whole val split
    checkpoint_every: int = Field(50, ge=0)  # 0 = only at the end
    keep_checkpoints: int = Field(2, ge=1)
    # Worker crashes survived by restoring a checkpoint; None = 3 with several workers, else 0.
    max_failures: int | None = Field(None, ge=-1)
    seed: int = Field(0, ge=0)
    # Feed and memory (soulray/train/feed.py, loop.py):
    shuffle_window_rows: int = Field(1024, ge=0)  # rows permuted together per epoch; 0 = in order
    loss_chunk_tokens: int = Field(
        1024, ge=0
    )  # logits computed this many tokens at a time; 0 = all
    # When FSDP reduces gradients: auto = after every micro-batch for full fine-tuning (a rank
    # never holds unsharded gradients of the whole model), after the last one for LoRA.
    grad_sync: Literal["auto", "every_micro_batch", "last_micro_batch"] = "auto"

    @model_validator(mode="after")
    def _check_cpu_offload(self) -> TrainConfig:
        """FSDP's CPU offload pins host memory, which needs a GPU: on a CPU run every worker
        crashed with a torch traceback (and restarted), and there is nothing to offload."""
        if self.cpu_offload and not self.use_gpu:
            raise ValueError(
                "train.cpu_offload=true moves a GPU run's parameters and optimizer state to host "
                "memory; this run trains on the CPU (train.use_gpu=false): unset "
                "train.cpu_offload, or set train.use_gpu=true"
            )
        return self


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of one deployment (passed as its autoscaling_config)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)  # per replica, what autoscaling aims for
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}; "
                "raise max_replicas or lower min_replicas"
            )
        return self


class DeploymentConfig(Section):
    """Replica options of one Serve deployment."""

    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(256, ge=1)  # concurrent requests one replica accepts
    max_queued_requests: int = Field(-1, ge=-1)  # -1 = unbounded; beyond it callers get 503
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)  # drain on delete/SIGTERM, then stop


class BatchingConfig(Section):
    enabled: bool = True  # False = one request at a time (the baseline the benchmark compares)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0)  # >0: an idle engine waits this long for more


class EngineConfig(DeploymentConfig):
    kind: Literal["hf", "vllm", "noop"] = "hf"  # noop: fixed reply, no model (overhead benchmark)
    model_dir: NonEmpty | None = None  # an export (local, s3://, gs://); None = train.export_dir
    adapter_dir: NonEmpty | None = None  # a peft LoRA adapter applied on model_dir (the base model)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    stream_interval_s: float = Field(0.05, ge=0)  # streamed text is sent at most this often
    # ...and at most this many stream messages per second over all of a replica's live streams
    # (16 streams at 100/s: one message per stream every 0.16 s); every message is a hop through
    # Serve, so under load fewer, larger ones; None = only stream_interval_s
    stream_max_messages_per_s: float | None = Field(100.0, gt=0)
    request_timeout_s: float | None = Field(300.0, gt=0)  # queue + generation; None = no limit
    vllm_engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # vLLM engine args
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    num_cpus: float = Field(1.0, ge=0)


# The crisis screen's categories (soulray/safety/): the keys of serve.safety.thresholds, intent,
# lexicon and patterns, and the names a help line's `categories` may list.
SAFETY_CATEGORIES = ("suicide", "self_harm", "violence", "abuse")


def _known_categories(names: Iterable[str]) -> None:
    """A misspelt category would silently drop its phrases or help lines: refuse it by name."""
    unknown = sorted(set(names) - set(SAFETY_CATEGORIES))
    if unknown:
        hints = [
            f"{u!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(u, SAFETY_CATEGORIES, 1))
            else repr(u)
            for u in unknown
        ]
        raise ValueError(f"unknown categories {', '.join(hints)}; use {list(SAFETY_CATEGORIES)}")


class HelpLine(Section):
    name: NonEmpty
    contact: NonEmpty  # what to dial or text, or a URL
    note: str = ""
    categories: list[str] = Field(default_factory=list)  # shown for these categories; [] = all

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, names: list[str]) -> list[str]:
        _known_categories(names)
        return names


class GuardRule(Section):
    """A lexicon guard (soulray/safety/lexicon.py): a hit does not count when `before` matches
    the sentence up to it and/or `after` the sentence after it (and `hit`, if given, the hit)."""

    before: str | None = None  # regex, anchored with $
    after: str | None = None  # regex, anchored with ^
    hit: str | None = None
    others: bool = False  # a third party's frame: never clears a hit the writer is in
    note: str = ""

    @model_validator(mode="after")
    def _needs_context(self) -> GuardRule:
        if not (self.before or self.after):
            raise ValueError("a guard needs a non-empty 'before' or 'after' regex")
        return self


class SafetyConfig(Section):
    """The crisis screen (soulray/safety/): a lexicon override plus a learned classifier over
    every user message and the model's reply; built-in lists and weights live in safety/data/."""

    enabled: bool = True
    mode: Literal["augment", "fixed"] = "augment"  # help lines + model reply, or a fixed reply
    scan_user_turns: int | None = Field(None, ge=1)  # None: every user message of the request
    # the classifier reads each message's last max_chars chars, the lexicon 5 times that
    max_chars: int = Field(400, ge=32)
    classifier: bool = True  # False: the lexicon alone (no embedding model loaded)
    # a message longer than the embedding reads (its last 48 tokens) has its first head_window
    # tokens embedded too (of the lexicon's span; 0: off): a crisis said first, then small talk,
    # was read by the n-grams alone; 24 chosen by measurement (bench/RESULTS.md, stop 45)
    head_window: int = Field(24, ge=0, le=512)
    # category -> threshold; None = train.py's choice; above 1 leaves the category to the lexicon
    # (0 or less would flag every message, NaN none: refused)
    thresholds: dict[str, Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] | None = None
    screen_reply: bool = True  # a model reply the screen flags is replaced by the fixed reply
    reply_threshold: float = Field(0.9, ge=0.0, le=1.0)  # classifier score a reply must reach
    reply_head: bool = True  # the reply head for method details (safety/reply.py)
    reply_head_threshold: float | None = Field(None, gt=0.0, le=1.0)  # None: train_reply's
    # the head's threshold when the person's messages are flagged (never above the one before);
    # None: train_reply's, the highest out of fold that still finds 95 % of method replies
    reply_head_threshold_flagged: float | None = Field(None, gt=0.0, le=1.0)
    locale: str = "auto"  # auto: zh-CN, -Hant, -HK or -TW for Chinese text, else default_locale
    default_locale: str = "en-US"
    intent: dict[str, list[str]] | None = None  # phrases no idiom exclusion can blank
    lexicon: dict[str, list[str]] | None = None  # category -> phrases; None = built-in
    patterns: dict[str, list[str]] | None = None  # category -> regexes; None = built-in
    # category -> regexes matched on the model's reply alone (method details); None = built-in
    reply_patterns: dict[str, list[str]] | None = None
    exclude: list[str] | None = None  # idioms, blanked for the lexicon and the classifier
    guard: list[GuardRule] | None = None  # someone else's / negated / past words; None = built-in
    resources: dict[str, list[HelpLine]] | None = None  # locale -> help lines; None = built-in
    fixed_reply: dict[str, str] | None = None  # locale -> the fixed safe reply; None = built-in
    header: dict[str, str] | None = None  # locale -> the line above the help lines; over built-in

    @field_validator("thresholds", "intent", "lexicon", "patterns", "reply_patterns")
    @classmethod
    def _check_categories(cls, by_category: dict[str, Any] | None) -> dict[str, Any] | None:
        _known_categories(by_category or {})
        return by_category

    @model_validator(mode="after")
    def _flagged_not_looser(self) -> SafetyConfig:
        calm, flagged = self.reply_head_threshold, self.reply_head_threshold_flagged
        if calm is not None and flagged is not None and flagged > calm:
            raise ValueError(
                f"reply_head_threshold_flagged={flagged} is above reply_head_threshold={calm}: "
                "replies to a person in crisis would be screened more loosely than others (the "
                f"lower applies); set it to {calm} or less, or leave it out"
            )
        return self


class AuthConfig(Section):
    """Bearer-token auth: on when a key is found (env var or mounted secret file)."""

    required: bool = False  # refuse to start without a key instead of serving openly
    api_key_env: str = "SOULRAY_API_KEY"
    api_key_file: NonEmpty | None = None  # e.g. a Kubernetes secret mounted as a file


class AdapterServeConfig(Section):
    """One LoRA adapter served over the base model under its own model name."""

    name: str = Field(min_length=1)  # the id in /v1/models and the `model` requests name
    path: NonEmpty  # a peft adapter directory (local, s3://, gs://), e.g. an export's adapter/


class ServeConfig(Section):
    model_name: NonEmpty = "soulray"  # the id in /v1/models and the `model` requests must name
    app_name: NonEmpty = "soulray"  # the Ray Serve application
    host: NonEmpty = "127.0.0.1"  # `soulray serve build` writes 0.0.0.0 (a cluster must listen)
    port: int = Field(8000, ge=1, le=65535)
    # Added to requests without one. None = the export's training prompt (serving.json), so
    # serving sees what training did; a string overrides it (logged), "" = no system prompt.
    system_prompt: str | None = None
    context_tokens: int | None = Field(None, ge=64)  # prompt + reply; None = the model's limit
    strategy_tags: bool | None = None  # None = as the export's soulray.yaml (data.strategy_tags)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)  # larger requests get a 400
    max_request_bytes: int = Field(65536, ge=1024)  # larger bodies get a 413
    max_messages: int = Field(256, ge=1)
    max_choices: int = Field(8, ge=1)  # a request's `n`; each choice is one more batch row
    # A request field the OpenAI API does not have is a 400 naming it; true = ignore such fields
    # (for a legacy client that sends its own), as soulray did before
    ignore_unknown_fields: bool = False
    debug_log_content: bool = False  # True writes message text to the logs; never in production
    # two_deployments: ingress and engine replicas scale apart; one_deployment: the hf/noop
    # engine runs inside the ingress replica (no handle hop per request and per stream message;
    # sized by serve.engine's options); auto: one_deployment for hf/noop, two for vllm (measured
    # in bench/RESULTS.md "Serve: speed"; README "Layout")
    layout: Literal["auto", "two_deployments", "one_deployment"] = "auto"
    ingress: DeploymentConfig = Field(default_factory=DeploymentConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # Multi-LoRA (hf engine): adapters over the base model, loaded on first use, at most
    # max_loaded_adapters per engine replica (least recently used unloaded first)
    adapters: list[AdapterServeConfig] = Field(default_factory=list)
    max_loaded_adapters: int = Field(4, ge=1)
    # How long a starting replica (the ingress, an hf engine; `soulray serve` before deploying)
    # waits for its export (serve.engine.model_dir, adapter_dir, serve.adapters) to be complete,
    # polling: a RayService applied together with the RayJob that trains it. 0 = fail at once
    # when it is missing or half written. A vllm engine loads the model itself and cannot wait:
    # refused with it
    wait_for_model_s: int = Field(0, ge=0)

    def resolved_layout(self) -> Literal["two_deployments", "one_deployment"]:
        """The layout `auto` stands for: the engine in the ingress, except vllm (its own
        deployment, Ray Serve LLM's)."""
        if self.layout != "auto":
            return self.layout
        return "two_deployments" if self.engine.kind == "vllm" else "one_deployment"

    @model_validator(mode="after")
    def _check_vllm(self) -> ServeConfig:
        """What the vllm engine cannot do, refused when the config is read (by `serve build`
        too), not when a cluster deploys it."""
        if self.engine.kind != "vllm":
            return self
        if self.adapters:
            raise ValueError(
                "serve.adapters (multi-LoRA) is served by the hf engine; use "
                "serve.engine.kind=hf or remove serve.adapters"
            )
        if self.engine.adapter_dir:
            raise ValueError(
                "the vllm engine serves the merged model at the export root; unset "
                "serve.engine.adapter_dir (soulray train writes the merged model beside adapter/)"
            )
        if self.layout == "one_deployment":
            raise ValueError(
                "serve.layout=one_deployment runs the hf or noop engine in the ingress; use "
                "serve.layout=two_deployments (or auto) with serve.engine.kind=vllm"
            )
        if self.wait_for_model_s:  # the ingress would wait while the engine fails to load
            raise ValueError(
                "serve.wait_for_model_s is for the hf engine: the vllm engine (Ray Serve LLM) "
                "loads the model in its own replica, which does not wait for it; set "
                "serve.wait_for_model_s=0 and deploy once the export is complete, or use "
                "serve.engine.kind=hf"
            )
        return self

    @model_validator(mode="after")
    def _check_adapter_names(self) -> ServeConfig:
        names = [self.model_name] + [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"serve.adapters names must be unique and differ from serve.model_name; "
                f"{dupes} appear more than once: rename them"
            )
        return self


Stage = Literal["prepare", "train", "serve"]
STAGES: tuple[Stage, ...] = ("prepare", "train", "serve")


class PipelineConfig(Section):
    run_dir: NonEmpty | None = None  # when set: data/, checkpoints/ and model/ all go under it
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), min_length=1)
    # After deploying, keep this driver (and a local Ray it started) up until Ctrl-C. Unset:
    # on a Ray it started itself only; on a cluster it joined (a Ray job) it returns, as the
    # Serve app outlives the job there (a job that waited would run until stopped).
    wait: bool | None = None


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def train_data_dir(self) -> str:
        """The prepared data training reads: train.data_dir, else data.output_dir."""
        return self.train.data_dir or self.data.output_dir

    @property
    def serve_model_dir(self) -> str:
        """The export the server loads: serve.engine.model_dir, else train.export_dir."""
        return self.serve.engine.model_dir or self.train.export_dir


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    parts = key.strip().split(".")
    node: Any = tree
    for part in parts[:-1]:  # a list's item by its index: eval.models.1.endpoint.base_url
        child = node[_list_index(override, part, node)] if isinstance(node, list) else None
        if not isinstance(node, list):
            _no_list_to_index(override, part, node)
            child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override {override!r}: '{part}' holds a value, not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"override {override!r}: the value is not valid YAML ({problem}); quote it, e.g. "
            f"{key.strip()}='\"...\"', or write a list as [a, b]"
        ) from None
    if isinstance(node, list):
        node[_list_index(override, parts[-1], node)] = value
    else:
        _no_list_to_index(override, parts[-1], node)
        node[parts[-1]] = value


def _no_list_to_index(override: str, part: str, node: dict[str, Any]) -> None:
    """An index into a list the config file does not set (defaults live in the schema)."""
    if part not in node and _is_index(part):
        raise ConfigError(
            f"override {override!r}: no list to take item {part} of (the config file does not "
            "set it); give the whole list instead, e.g. key=[a, b]"
        )


def _is_index(part: str) -> bool:
    return part.removeprefix("-").isdigit()


def _list_index(override: str, part: str, items: list[Any]) -> int:
    if _is_index(part) and -len(items) <= int(part) < len(items):
        return int(part)
    valid = f"an index, 0 to {len(items) - 1}, or" if items else "the list is empty:"
    raise ConfigError(
        f"override {override!r}: '{part}' is not an item of that list of {len(items)} (give "
        f"{valid} replace the whole list)"
    )


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (used to suggest the key the user meant)."""
    node = _type_at(model, loc)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _type_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The type of the value at `loc`, through sections, lists and dicts of sections
    (serve.adapters.0, serve.safety.resources.en-US.0); None where no field is."""
    node: Any = model
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return None
            node = field.annotation
        elif get_origin(node) in (list, tuple) and get_args(node):
            node = get_args(node)[0]  # part is an index
        elif get_origin(node) is dict and len(get_args(node)) == 2:
            node = get_args(node)[1]  # part is a key
        else:
            return None
    return _unwrap(node)


def _unwrap(annotation: Any) -> Any:
    """X from `X | None`."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" Did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            if len(loc) > 1 and loc[-1] in Config.model_fields:  # train.lora.enabled
                hint = f" '{loc[-1]}' is a section of its own: write '{loc[-1]}.…', not '{name}.…'."
            lines.append(f"unknown config key '{name}'.{hint} Valid keys here: {', '.join(known)}")
        elif (
            e["type"] == "list_type"
            and isinstance(e.get("input"), str)
            and _type_at(Config, loc) == list[str]
        ):
            value = e.get("input")  # a one-item list written without its brackets
            lines.append(
                f"config key '{name}' is a list: write it in brackets, {name}=[{value}] (or "
                f"[a, b] for more) (got {value!r})"
            )
        else:
            got = e.get("input")  # a section's own check: not the whole section again
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"config key '{name}': {e['msg']}{shown}")
    return f"invalid config ({origin}):\n  " + "\n  ".join(lines)


def read_setting_file(key: str, path: str) -> str:
    """The text of a file a config key names; a missing or unreadable one is an error that
    names the key (the packaged default is what leaving the key unset gives)."""
    if "://" in path:
        raise ValueError(f"{key}={path}: give a local file (a remote one is not read here)")
    try:  # ~ as in every other path (storage.normalize)
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(
            f"{key}={path}: no such file; give the path of a YAML file of the packaged one's "
            f"shape, or leave {key} unset for the packaged one"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{key}={path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{key}={path} cannot be read ({e.strerror})") from None


def parse_setting_yaml(key: str, path: str, text: str) -> Any:
    """A setting file's YAML; broken YAML is an error naming the key and where it broke (not
    a yaml traceback)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ValueError(f"{key}={path} is not valid YAML{at}: fix the file") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key written twice in one mapping: YAML keeps the
    last, so a second `serve:` section silently dropped everything the first one set.

    Checked on the document as written, before anything is constructed: constructing a mapping
    with a merge key (`<<: *base`) rewrites the anchored mappings it merges in place (their
    own merged keys put before theirs), so an anchored mapping overriding a key it merges
    looked written twice when it was checked after another mapping had merged it."""

    def construct_document(self, node: yaml.Node) -> Any:
        self.check_unique_keys(node, set())
        return super().construct_document(node)

    def check_unique_keys(self, node: yaml.Node, done: set[int]) -> None:
        if id(node) in done:  # an alias is its anchored node again (a document may loop)
            return
        done.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self.check_unique_keys(item, done)
        if not isinstance(node, yaml.MappingNode):
            return
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            merge = key_node.tag == "tag:yaml.org,2002:merge"  # `<<: *base` may be overridden
            if isinstance(key_node, yaml.ScalarNode) and not merge:  # else yaml refuses it
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} appears twice in one section (the second would "
                        "silently replace the first): merge them",
                        key_node.start_mark,
                    )
                seen.add(key)
            self.check_unique_keys(value_node, done)


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and why YAML broke, on one line (yaml's own text spans five, quoting the line and
    calling the file "<unicode string>")."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    tabs = "; indent with spaces, not tabs" if "'\\t'" in problem else ""
    return f"{at}: {problem}{tabs}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides and validate."""
    if path is None:
        return parse_config("", "defaults", overrides)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"--config {path} is not a file; name a YAML file (see jobs/)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    return parse_config(text, str(path), overrides)


def parse_config(text: str, origin: str, overrides: list[str] | None = None) -> Config:
    """Validate YAML text plus overrides; `origin` names the source in error messages."""
    try:
        loaded = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"config {origin} is not valid YAML{yaml_problem(e)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {origin} must hold a mapping at the top level")
    tree: dict[str, Any] = loaded or {}
    for override in overrides or []:
        apply_override(tree, override)
    if overrides:
        origin += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_hash(config: BaseModel) -> str:
    """Stable short hash of a config (section), for manifests and stage skipping."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
