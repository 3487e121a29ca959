"""The `eval:` section of the config tree: models under test, contexts, judge, modes, the gate.

Kept here rather than in soulray/config.py so the evaluator's knobs live beside the code that
reads them; soulray/config.py adds the one `eval` field. Endpoints use the shared
`EndpointConfig` (URL, model, key env var, retries, concurrency bound).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from soulray.endpoints import EndpointConfig

Language = Literal["zh", "en"]
LANGUAGES: tuple[Language, ...] = ("zh", "en")


class EvalSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GreedyEndpointConfig(EndpointConfig):
    """A model under test or the judge: greedy unless set, so a reply differs between models,
    not between runs, and the judge's order-swapped verdicts are not noise."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)


class ModelEndpointConfig(GreedyEndpointConfig):
    """A model under test's endpoint. A model trained with strategy tags saw each earlier reply
    of the history as "[Strategy] text": `send_strategies` sends those strategies with the
    history (`messages[i].strategy`, which soulray serve reads); off by default, since other
    OpenAI-compatible servers may refuse the unknown field."""

    send_strategies: bool = False


class EvalModel(EvalSection):
    """One model under test: a name for the report and its endpoint."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    endpoint: ModelEndpointConfig


class ContextsConfig(EvalSection):
    """Where the held-out dialogues come from; each counselor turn gives one context."""

    source: Literal["prepared", "files"] = "prepared"
    prepared_dir: str | None = None  # a `soulray prepare` output: its val split is used
    inputs: list[str] = Field(default_factory=list)  # any corpus files prepare reads (all used)
    format: Literal["auto", "messages", "sharegpt", "smile", "xtuner", "esconv"] = "auto"
    n: int = Field(100, ge=1)  # contexts sampled (fewer when the source has fewer)
    seed: int = 0
    language: Literal["auto", "zh", "en"] = "auto"  # tokens for the metrics: chars or words

    @model_validator(mode="after")
    def _check_source(self) -> ContextsConfig:
        if self.source == "prepared" and not self.prepared_dir:
            raise ValueError(
                "source 'prepared' needs prepared_dir (a `soulray prepare` output directory); "
                "or set source: files with inputs: [...]"
            )
        if self.source == "files" and not self.inputs:
            raise ValueError("source 'files' needs inputs: [corpus files, globs or directories]")
        return self


class JudgeConfig(EvalSection):
    endpoint: GreedyEndpointConfig | None = None  # None: no judge scores, reference metrics only
    rubric: str = "soulchat"  # soulchat | cpsycoune | a YAML file of the same shape
    retries: int = Field(2, ge=0)  # unusable answers sent back with the reason, then unscored
    pairwise: bool = True  # compare every pair of models on each context, both orders


class InteractiveConfig(EvalSection):
    """Seeker-driven dialogues (synth's Seeker): each model talks with the same scenarios."""

    enabled: bool = False
    seeker: EndpointConfig | None = None  # None: the judge's endpoint plays the Seeker
    # the judge's endpoint playing the Seeker (seeker: null) answers at this temperature, not
    # the judge's greedy one; a `seeker` endpoint has its own temperature
    seeker_temperature: float = Field(0.7, ge=0.0, le=2.0)
    scenarios: int = Field(6, ge=1)  # attitudes open / neutral / resistant in turn
    turns: int = Field(4, ge=1)  # Seeker messages per dialogue (fewer if it ends the chat)
    languages: list[Language] = Field(default_factory=lambda: list(LANGUAGES), min_length=1)
    seed: int = 0
    seeker_prompts: str | None = None  # a YAML like soulray/synth/prompts.yaml; None = packaged


class GateConfig(EvalSection):
    """What `--fail-if-worse BASELINE` compares: `candidate`'s `metric` against the baseline's."""

    candidate: str | None = None  # a model name; None = the first model
    metric: str = "judge_total"  # judge_total | judge.<Dimension> | bleu_4 | rouge_l | ...


class EvalConfig(EvalSection):
    models: list[EvalModel] = Field(default_factory=list)
    contexts: ContextsConfig | None = None  # None: no turn-based mode (interactive only)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    interactive: InteractiveConfig = Field(default_factory=InteractiveConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    output_dir: str = "runs/eval"
    examples: int = Field(3, ge=0)  # contexts shown side by side in report.md
    seed: int = 0  # bootstrap resampling

    @model_validator(mode="after")
    def _check_models(self) -> EvalConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.gate.candidate is not None and self.models and self.gate.candidate not in names:
            raise ValueError(f"gate.candidate {self.gate.candidate!r} is not one of {names}")
        return self
