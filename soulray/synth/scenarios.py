"""Who the Seeker plays: scenarios drawn from the packaged pool, or from a corpus's situations.

A scenario's id is a hash of its content, so the same config draws the same ids on every run
(resume skips ids already written) and two equal scenarios can never both be drawn.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Literal

import yaml

from soulray import storage
from soulray.config import parse_setting_yaml, read_setting_file
from soulray.data.formats import FILE_SUFFIXES, split_records
from soulray.text import Language, detect_language

Attitude = Literal["open", "neutral", "resistant"]
LANGUAGES: tuple[Language, ...] = ("zh", "en")
ATTITUDES: tuple[Attitude, ...] = ("open", "neutral", "resistant")
INTENSITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Scenario:
    id: str
    language: Language
    age: int
    occupation: str
    personality: str
    problem_type: str
    emotion: str
    intensity: int  # 1 (mild) .. 5 (overwhelming)
    situation: str
    attitude: Attitude

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scenario_id(fields: dict[str, Any]) -> str:
    """Content hash of every field but the id: stable across runs and machines."""
    canonical = json.dumps({k: v for k, v in fields.items() if k != "id"}, sort_keys=True)
    return "sc-" + hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def make_scenario(**fields: Any) -> Scenario:
    """A Scenario whose id is its content hash."""
    return Scenario(id=scenario_id(fields), **fields)


def load_pool(path: str | None = None) -> dict[str, dict[str, Any]]:
    """The scenario pool: the packaged scenarios.yaml, or a YAML file of the same shape."""
    if path is None:
        text = resources.files("soulray.synth").joinpath("scenarios.yaml").read_text("utf-8")
    else:
        text = read_setting_file("synth.scenarios.pool_file", path)
    pool = (
        yaml.safe_load(text)
        if path is None
        else parse_setting_yaml("synth.scenarios.pool_file", path, text)
    )
    if not isinstance(pool, dict) or not pool:
        raise ValueError(
            f"scenario pool {path}: expected a mapping of languages ({LANGUAGES}) to sections "
            "with ages, occupations, personalities, emotions, problems; see soulray/synth/"
            "scenarios.yaml"
        )
    for lang, section in pool.items():
        missing = {"ages", "occupations", "personalities", "emotions", "problems"} - set(section)
        if lang not in LANGUAGES or missing:
            raise ValueError(
                f"scenario pool {path or 'scenarios.yaml'}: section {lang!r} must be one of "
                f"{LANGUAGES} with keys ages, occupations, personalities, emotions, problems "
                f"(missing: {sorted(missing)})"
            )
    return pool


def require_languages(
    pool: dict[str, Any], languages: Sequence[str], pool_file: str | None = None
) -> None:
    """Every language asked for (synth.scenarios.languages) has a section in the pool."""
    missing = [lang for lang in languages if lang not in pool]
    if missing:
        raise ValueError(
            f"the scenario pool {pool_file or 'scenarios.yaml'} has no {missing} section for "
            f"synth.scenarios.languages; add one or drop {missing}"
        )


def pool_size(pool: dict[str, Any], language: Language) -> int:
    """How many distinct scenarios one language's pool can make (an entry listed twice
    makes no second scenario)."""
    p = pool[language]
    situations = {(pr["type"], s) for pr in p["problems"] for s in pr["situations"]}
    people = len({int(a) for a in p["ages"]}) * len(set(p["occupations"]))
    people *= len(set(p["personalities"]))
    return people * len(situations) * len(set(p["emotions"])) * len(INTENSITIES) * len(ATTITUDES)


def build_scenarios(
    n: int, seed: int, languages: list[Language], pool: dict[str, Any] | None = None
) -> list[Scenario]:
    """`n` distinct scenarios, languages alternating, the same list for the same seed."""
    pool = pool or load_pool()
    require_languages(pool, languages)
    # languages take turns, so each must make its own share (summed over its places in the
    # list), or the draw below never ends
    shares: Counter[Language] = Counter()
    for i, lang in enumerate(languages):
        shares[lang] += len(range(i, n, len(languages)))
    for lang, share in shares.items():
        if share > pool_size(pool, lang):
            raise ValueError(
                f"asked for {n} scenarios, {share} of them {lang} (languages take turns), but "
                f"the {lang} pool makes only {pool_size(pool, lang)}; lower the count or add "
                "to the pool"
            )
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Scenario] = []
    while len(out) < n:
        language = languages[len(out) % len(languages)]
        scenario = draw_scenario(rng, pool[language], language)
        if scenario.id not in seen:
            seen.add(scenario.id)
            out.append(scenario)
    return out


def draw_scenario(rng: random.Random, p: dict[str, Any], language: Language) -> Scenario:
    problem = rng.choice(p["problems"])
    return make_scenario(
        language=language,
        age=int(rng.choice(p["ages"])),
        occupation=rng.choice(p["occupations"]),
        personality=rng.choice(p["personalities"]),
        problem_type=problem["type"],
        emotion=rng.choice(p["emotions"]),
        intensity=rng.choice(INTENSITIES),
        situation=rng.choice(problem["situations"]),
        attitude=rng.choice(ATTITUDES),
    )


def scenarios_from_corpus(
    inputs: list[str],
    n: int,
    seed: int,
    pool: dict[str, Any] | None = None,
    languages: Sequence[str] = LANGUAGES,
) -> list[Scenario]:
    """Scenarios from the `situation` fields of a corpus (ESConv and any record that has one),
    read with the prepare stage's record splitter; the persona, which corpora do not record,
    is drawn from the pool. One scenario per distinct situation in `languages`; `n` = 0 takes
    them all."""
    pool = pool or load_pool()
    require_languages(pool, languages)
    rng = random.Random(seed)
    out: dict[str, Scenario] = {}
    files = storage.expand_inputs(inputs, FILE_SUFFIXES, "synth.scenarios.inputs")
    for path in files:
        for raw in split_records(path, storage.read_bytes(path)):
            scenario = scenario_from_record(raw.record, pool, rng, languages)
            if scenario is not None:  # one scenario per distinct situation
                out.setdefault(scenario.situation, scenario)
    if not out:
        raise ValueError(
            f"no record in {inputs} has a 'situation' text in {list(languages)} "
            "(synth.scenarios.languages); use an ESConv-shaped corpus or "
            "synth.scenarios.source: pool"
        )
    found = list(out.values())
    return found if n == 0 else found[:n]


def scenario_from_record(
    record: Any, pool: dict[str, Any], rng: random.Random, languages: Sequence[str] = LANGUAGES
) -> Scenario | None:
    """One corpus record's situation as a scenario; None when it has no situation text, or
    one in a language not asked for."""
    if not isinstance(record, dict) or not isinstance(record.get("situation"), str):
        return None
    situation = record["situation"].strip()
    if not situation:
        return None
    language = detect_language(situation)
    if language not in languages:
        return None
    p = pool[language]
    return make_scenario(
        language=language,
        age=int(rng.choice(p["ages"])),
        occupation=rng.choice(p["occupations"]),
        personality=rng.choice(p["personalities"]),
        problem_type=str(record.get("problem_type") or rng.choice(p["problems"])["type"]),
        emotion=str(record.get("emotion_type") or rng.choice(p["emotions"])),
        intensity=intensity_of(record, rng),
        situation=situation,
        attitude=rng.choice(ATTITUDES),
    )


def intensity_of(record: dict[str, Any], rng: random.Random) -> int:
    """ESConv's first survey score (emotion intensity 1-5) when present, else drawn."""
    survey = record.get("survey_score")
    seeker = survey.get("seeker") if isinstance(survey, dict) else None
    raw = seeker.get("initial_emotion_intensity") if isinstance(seeker, dict) else None
    try:
        value = int(raw)  # type: ignore[arg-type]  # "5", 5 or junk
    except (TypeError, ValueError):
        return rng.choice(INTENSITIES)
    return min(max(value, 1), 5)
