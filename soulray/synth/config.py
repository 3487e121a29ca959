"""The `synth` section of the config tree: endpoints per role, scenarios, loop, quality, job."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soulray.endpoints import EndpointConfig

LOCAL_ENDPOINT = "http://127.0.0.1:8000/v1"  # where `soulray serve` listens by default


class Section(BaseModel):
    # Like soulray.config.Section; not imported from there, because soulray.config imports
    # this module for its `synth` field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolesConfig(Section):
    """One endpoint per role. The Seeker's unset fields come from the local `soulray serve`
    endpoint; the Counselor's and Supporter's from the Seeker's, so
    `synth.roles.counselor.temperature=0.2` alone changes one knob of the same endpoint."""

    seeker: EndpointConfig
    counselor: EndpointConfig
    supporter: EndpointConfig

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        local = {"base_url": LOCAL_ENDPOINT, "model": "soulray"}
        seeker = local | as_dict(data, "seeker")
        inherited = local | valid_fields(seeker)
        return data | {
            "seeker": seeker,
            "counselor": inherited | as_dict(data, "counselor"),
            "supporter": inherited | as_dict(data, "supporter"),
        }

    @property
    def resolved(self) -> dict[str, EndpointConfig]:
        return {"seeker": self.seeker, "counselor": self.counselor, "supporter": self.supporter}


def valid_fields(endpoint: dict[str, Any]) -> dict[str, Any]:
    """The endpoint fields EndpointConfig accepts: a bad one is reported once, under the
    seeker's key the user wrote, not again under each role that would inherit it."""
    try:
        EndpointConfig.model_validate(endpoint)
        bad: set[Any] = set()
    except ValidationError as e:
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
    return {k: v for k, v in endpoint.items() if k in EndpointConfig.model_fields and k not in bad}


def as_dict(data: dict[str, Any], role: str) -> dict[str, Any]:
    """The role's endpoint fields; a role set to one value (a URL, say) is a user error."""
    value = data.get(role)
    if isinstance(value, EndpointConfig):
        return value.model_dump()
    if value is not None and not isinstance(value, dict):
        raise ValueError(
            f"synth.roles.{role} is a section of endpoint fields, not one value (got "
            f"{value!r}); set one field, e.g. synth.roles.{role}.base_url=http://host:8000/v1"
        )
    return dict(value or {})


class ScenarioConfig(Section):
    source: Literal["pool", "corpus"] = "pool"
    count: int = Field(100, ge=0)  # scenarios to make; 0 with source=corpus = every situation
    languages: list[Literal["zh", "en"]] = Field(default_factory=lambda: ["zh", "en"])  # type: ignore[arg-type]
    pool_file: str | None = None  # a YAML like soulray/synth/scenarios.yaml; None = packaged
    inputs: list[str] = Field(default_factory=list)  # corpus files (source=corpus), e.g. ESConv

    @model_validator(mode="after")
    def _check_source(self) -> ScenarioConfig:
        if self.source == "corpus" and not self.inputs:
            raise ValueError("synth.scenarios.source=corpus needs synth.scenarios.inputs=[...]")
        if self.source == "pool" and self.count == 0:
            raise ValueError("synth.scenarios.count must be >= 1 for source=pool")
        if not self.languages:
            raise ValueError("synth.scenarios.languages is empty; use [zh], [en] or [zh, en]")
        return self


class LoopConfig(Section):
    min_turns: int = Field(3, ge=1)  # Supporter replies before the Seeker may end it
    max_turns: int = Field(8, ge=1)  # Supporter replies at most
    counselor_retries: int = Field(2, ge=0)  # unusable Counselor answers retried, then fallback

    @model_validator(mode="after")
    def _check_range(self) -> LoopConfig:
        if self.min_turns > self.max_turns:
            raise ValueError(
                f"synth.loop.min_turns={self.min_turns} exceeds max_turns={self.max_turns}"
            )
        return self


class QualityConfig(Section):
    check_language: bool = True  # an utterance not in the scenario's language ends or drops it
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)  # Jaccard of 5-gram shingles


class JobConfig(Section):
    actors: int = Field(2, ge=1)  # Ray Data actor pool size
    dialogues_per_actor: int = Field(16, ge=1)  # dialogues one actor runs concurrently (asyncio)
    num_cpus_per_actor: float = Field(0.5, ge=0)  # the work is waiting on HTTP, not CPU
    progress_every_s: float = Field(10.0, gt=0)  # how often the progress line is logged


class SynthConfig(Section):
    output_dir: str = "runs/synth"  # shards here; report and logs under _synth/ (prepare skips)
    seed: int = 0
    taxonomy_file: str | None = None  # a YAML like soulray/synth/strategies.yaml
    prompts_file: str | None = None  # a YAML like soulray/synth/prompts.yaml
    roles: RolesConfig = Field(default_factory=lambda: RolesConfig.model_validate({}))
    scenarios: ScenarioConfig = Field(default_factory=ScenarioConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    job: JobConfig = Field(default_factory=JobConfig)
    charts: bool = True  # PNG charts beside synth_report.json
