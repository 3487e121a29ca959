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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class StrategyConfig(Section):
    taxonomy: list[str] = Field(default_factory=lambda: list(ESCONV_STRATEGIES))
    aliases: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_STRATEGY_ALIASES))
    fallback: str = "Others"  # what an unknown strategy name becomes (counted in the manifest)


class DataConfig(Section):
    inputs: list[str] = Field(default_factory=list)  # files, globs, directories; local or s3:// gs://
    format: Literal["auto", "messages", "sharegpt", "smile", "xtuner", "esconv"] = "auto"
    output_dir: str = "runs/data"
    seq_len: int = Field(2048, ge=16)
    mode: Literal["packed", "padded"] = "packed"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    strategy_tags: bool = False  # prefix assistant targets with "[Strategy] "
    strategies: StrategyConfig = Field(default_factory=StrategyConfig)
    system_prompt: str | None = None  # added to conversations that have none
    strict: bool = False  # stop at the first bad record instead of rejecting it
    tokenizer_vocab_size: int = Field(4096, ge=300)  # for the tokenizer trained with no model
    tokenizer_train_conversations: int = Field(20000, ge=1)  # sample size for that training
    pack_block: int = Field(4096, ge=1)  # conversations rendered and packed together
    num_workers: int = Field(0, ge=0)  # render/pack actors; 0 = one per CPU in the cluster
    seed: int = 0


class TinyModelConfig(Section):
    """Shape of the small model built from config when no checkpoint is given."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


class ModelConfig(Section):
    name_or_path: str | None = None  # local HF directory or hub id; None = the tiny default
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    attn_implementation: Literal[
        "auto", "flash_attention_3", "flash_attention_2", "varlen", "sdpa", "eager"
    ] = "auto"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.name_or_path


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (used to suggest the key the user meant)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(Config, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" Did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown config key '{name}'.{hint} Valid keys here: {', '.join(known)}")
        else:
            lines.append(f"config key '{name}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid config ({origin}):\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply dotted overrides and validate."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
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
