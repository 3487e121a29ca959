"""The strategy taxonomy the Counselor picks from, and how its JSON answer is read.

Names are matched the way `soulray prepare` matches labels (data/conversation.py's lookup:
case-insensitive, brackets ignored, the same aliases), so what synth writes is what prepare
keeps, never something it maps to its fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from soulray.config import (
    DEFAULT_STRATEGY_ALIASES,
    StrategyConfig,
    parse_setting_yaml,
    read_setting_file,
)
from soulray.data.conversation import build_strategy_lookup
from soulray.json_objects import load_objects

STAGES = ("exploration", "comforting", "action")


@dataclass(frozen=True)
class Strategy:
    name: str
    stages: tuple[str, ...]  # the first is where the strategy is used most
    definitions: dict[str, str]  # language -> definition


@dataclass(frozen=True)
class Taxonomy:
    strategies: tuple[Strategy, ...]
    fallback: str
    lookup: dict[str, str]  # lower-cased spelling -> name

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.strategies]

    def get(self, name: str) -> Strategy:
        return next(s for s in self.strategies if s.name == name)

    def stage_of(self, name: str) -> str:
        return self.get(name).stages[0]

    def render(self, language: str) -> str:
        """The list shown to the Counselor, one strategy a line."""
        return "\n".join(
            f"- {s.name}: {s.definitions[language]} [{', '.join(s.stages)}]"
            for s in self.strategies
        )

    def strategy_config(self) -> StrategyConfig:
        """The `data.strategies` section that makes prepare keep these names as they are."""
        return StrategyConfig(taxonomy=self.names, aliases={}, fallback=self.fallback)


@dataclass(frozen=True)
class CounselorChoice:
    strategy: str
    rationale: str


class CounselorAnswerError(ValueError):
    """An answer that cannot be used; `reason` is invalid_json or unknown_strategy."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def load_taxonomy(path: str | None = None) -> Taxonomy:
    """The packaged strategies.yaml (ESConv's 8), or a YAML file of the same shape."""
    if path is None:
        text = resources.files("soulray.synth").joinpath("strategies.yaml").read_text("utf-8")
    else:
        text = read_setting_file("synth.taxonomy_file", path)
    data = (
        yaml.safe_load(text)
        if path is None
        else parse_setting_yaml("synth.taxonomy_file", path, text)
    )
    return build_taxonomy(data, path or "strategies.yaml")


def build_taxonomy(data: Any, origin: str) -> Taxonomy:
    """The taxonomy a file describes; a file of another shape is refused naming the file and
    the field, not with a KeyError (or a data.strategies message about another setting)."""

    def bad(what: str) -> ValueError:
        return ValueError(f"taxonomy {origin}: {what} (see soulray/synth/strategies.yaml)")

    if not isinstance(data, dict) or not isinstance(data.get("strategies"), list):
        raise bad("expected a mapping with a `strategies:` list")
    strategies = []
    for i, s in enumerate(data["strategies"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise bad(f"strategies[{i}] needs a `name:`")
        stages = s.get("stages")
        if not isinstance(stages, list) or not stages or any(x not in STAGES for x in stages):
            raise bad(f"strategy {s['name']!r} needs `stages:` as a list from {list(STAGES)}")
        if not all(isinstance(s.get(lang), str) and s[lang] for lang in ("en", "zh")):
            raise bad(f"strategy {s['name']!r} needs its definition under both `en:` and `zh:`")
        strategies.append(
            Strategy(s["name"], tuple(stages), {lang: s[lang] for lang in ("en", "zh")})
        )
    names = [s.name for s in strategies]
    twice = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if twice:
        raise bad(f"strategy names must differ (ignoring case): {twice}")
    fallback = data.get("fallback", "Others")
    if fallback not in names:
        raise bad(f"`fallback: {fallback}` is not one of its strategies {names}")
    extra = data.get("aliases") or {}
    if not isinstance(extra, dict) or any(t not in names for t in extra.values()):
        raise bad(f"`aliases:` must map spellings to its strategies {names}")
    aliases = {a: t for a, t in DEFAULT_STRATEGY_ALIASES.items() if t in names} | extra
    lookup = build_strategy_lookup(
        StrategyConfig(taxonomy=names, aliases=aliases, fallback=fallback)
    )
    return Taxonomy(tuple(strategies), fallback, lookup)


def parse_counselor_answer(text: str, taxonomy: Taxonomy) -> CounselorChoice:
    """Read {"strategy", "rationale"} from an answer that may be fenced or wrapped in prose:
    the first object naming a strategy of the taxonomy, since an echoed schema
    ({"strategy": "<one of the names>"}) or an example may come before the answer."""
    objects = load_objects(text, complete_only=True)  # a cut-off rationale is retried
    answers = [o for o in objects if isinstance(o.get("strategy"), str)]
    if not answers:
        what = "no string 'strategy'" if objects else "no JSON object"
        raise CounselorAnswerError("invalid_json", f"{what} in {text[:80]!r}")
    for answer in answers:
        name = taxonomy.lookup.get(answer["strategy"].strip().strip("[]").strip().lower())
        if name is not None:
            rationale = answer.get("rationale")
            return CounselorChoice(name, rationale.strip() if isinstance(rationale, str) else "")
    raw = answers[-1]["strategy"]  # after any echoed schema
    raise CounselorAnswerError("unknown_strategy", f"{raw!r} is not in the taxonomy")
