"""report.json (every sample and every score) and its summary: means with 95 % bootstrap CIs,
Distinct-n, judge coverage (scored / unscored with reasons), pairwise win rates, Seeker-driven
dialogue scores and strategy distributions. report.md and the charts are rendered from the
written report.json (`write_report`), so no number is ever computed twice.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from soulray import storage
from soulray.endpoints import reason_key
from soulray.eval.config import EvalConfig
from soulray.eval.contexts import Context
from soulray.eval.judge import Rubric
from soulray.eval.metrics import REFERENCE_METRICS, distinct, tokenize
from soulray.eval.stats import summarize
from soulray.synth.scenarios import Scenario

TURN_METRICS = (*REFERENCE_METRICS, "length")


def judge_values(rows: list[dict[str, Any] | None], rubric: Rubric) -> dict[str, list[float]]:
    """'total' and each dimension over the scored judgements."""
    values: dict[str, list[float]] = {"total": []}
    values |= {d.name: [] for d in rubric.dimensions}
    for j in rows:
        if j and j.get("scores"):
            values["total"].append(float(sum(j["scores"].values())))
            for name, score in j["scores"].items():
                values[name].append(float(score))
    return values


def reason_label(error: str) -> str:
    """An unscored item's reason as the report groups it: its first word, and for an endpoint
    failure the endpoint's own ("endpoint: connection", "endpoint: http_503"), so the cause
    shows in report.md without each message's details."""
    label, _, rest = error.partition(":")
    if label.strip() == "endpoint" and rest:
        return f"endpoint: {reason_key(rest)}"
    return reason_key(label)


def judge_summary(rows: list[dict[str, Any] | None], rubric: Rubric, seed: int) -> dict[str, Any]:
    judged = [j for j in rows if j is not None]
    unscored = [j for j in judged if not j.get("scores")]
    reasons = Counter(reason_label(str(j.get("error", ""))) for j in unscored)
    return {
        "judged": len(judged),
        "scored": len(judged) - len(unscored),
        "unscored": len(unscored),
        "unscored_reasons": dict(reasons.most_common()),
        "scores": {k: summarize(v, seed) for k, v in judge_values(rows, rubric).items()},
    }


def distinct_summary(tokens: list[list[str]], n: int) -> dict[str, Any]:
    """Distinct-n of all the replies, without a CI: a bootstrap resample repeats replies, which
    lowers Distinct by construction (its percentile interval would not even hold the value)."""
    return {"n": len(tokens), "mean": distinct(tokens, n) if tokens else None, "ci": [None, None]}


def turn_summary(
    contexts: list[Context], rows: list[dict[str, Any]], rubric: Rubric | None, seed: int
) -> dict[str, Any]:
    ok = [(c, r) for c, r in zip(contexts, rows, strict=True) if r["text"] is not None]
    metrics = {k: summarize([r["metrics"][k] for _, r in ok], seed) for k in TURN_METRICS}
    tokens = [tokenize(r["text"], c.language) for c, r in ok]
    for n in (1, 2):
        metrics[f"distinct_{n}"] = distinct_summary(tokens, n)
    judged = [r.get("judge") for r in rows]
    return {
        "replies": len(rows),
        "failed": len(rows) - len(ok),
        "failure_reasons": dict(Counter(str(r["error"]).split(":")[0] for r in rows if r["error"])),
        "metrics": metrics,
        "judge": judge_summary(judged, rubric, seed) if rubric and any(judged) else None,
    }


def pairwise_summary(pair: dict[str, Any], seed: int) -> dict[str, Any]:
    outcomes = [c["outcome"] for c in pair["comparisons"]]
    scored = [o for o in outcomes if o is not None]
    counts = Counter(scored)
    points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in scored]
    rate = {k: (counts[k] / len(scored) if scored else None) for k in ("win", "tie", "loss")}
    return {
        "model_1": pair["model_1"],
        "model_2": pair["model_2"],
        "compared": len(outcomes),
        "scored": len(scored),
        "unscored": len(outcomes) - len(scored),
        **{k: counts[k] for k in ("win", "tie", "loss")},
        **{f"{k}_rate": v for k, v in rate.items()},
        "score": summarize(points, seed),  # model_1's mean points: 1 win, 0.5 tie, 0 loss
    }


def dialogue_summary(records: list[dict[str, Any]], rubric: Rubric, seed: int) -> dict[str, Any]:
    judged = any(r.get("judge") is not None for r in records)  # None: the run had no judge
    by_attitude = {}
    for attitude in sorted({r["attitude"] for r in records}) if judged else []:
        rows = [r.get("judge") for r in records if r["attitude"] == attitude]
        by_attitude[attitude] = summarize(judge_values(rows, rubric)["total"], seed)
    # of finished dialogues: a failed one's partial turns are no length (it is counted apart)
    turns = [
        sum(m["role"] == "assistant" for m in r["messages"]) for r in records if r["error"] is None
    ]
    return {
        "dialogues": len(records),
        "failed": sum(r["error"] is not None for r in records),
        "model_turns": summarize([float(t) for t in turns], seed),
        "judge": judge_summary([r.get("judge") for r in records], rubric, seed) if judged else None,
        "by_attitude": by_attitude,
    }


def strategy_summary(
    contexts: list[Context], replies: dict[str, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """Reported strategies against the references' (only models that report any)."""
    reported = {
        m: Counter(r["strategy"] for r in rows if r.get("strategy")) for m, rows in replies.items()
    }
    reported = {m: c for m, c in reported.items() if c}
    if not reported:
        return None
    reference = Counter(c.reference_strategy for c in contexts if c.reference_strategy)
    return {
        "reference": dict(reference.most_common()),
        "models": {m: dict(c.most_common()) for m, c in reported.items()},
        "tvd": {m: total_variation(c, reference) for m, c in reported.items()} if reference else {},
    }


def total_variation(a: Counter, b: Counter) -> float:
    """Half the L1 distance between two normalised distributions (0 = same, 1 = disjoint)."""
    ta, tb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / ta - b[k] / tb) for k in set(a) | set(b))


def build_report(
    cfg: EvalConfig,
    rubric: Rubric,
    contexts: list[Context],
    replies: dict[str, list[dict[str, Any]]],
    scores: dict[str, list[Any]],
    pairs: list[dict[str, Any]],
    dialogues: dict[str, list[dict[str, Any]]],
    scenarios: list[Scenario],
    meta: dict[str, Any],
) -> dict[str, Any]:
    for model, judged in scores.items():
        for row, j in zip(replies[model], judged, strict=True):
            row["judge"] = j
    judge = rubric if cfg.judge.endpoint else None
    seed = cfg.seed
    summary = {
        "turn": {m: turn_summary(contexts, rows, judge, seed) for m, rows in replies.items()},
        "pairwise": [pairwise_summary(p, seed) for p in pairs],
        "interactive": {m: dialogue_summary(r, rubric, seed) for m, r in dialogues.items()},
        "strategies": strategy_summary(contexts, replies),
    }
    return {
        "meta": meta | {"rubric": rubric.model_dump(), "examples": cfg.examples},
        "summary": summary,
        "contexts": [c.to_json() for c in contexts],
        "replies": replies,
        "pairwise": pairs,
        "scenarios": [s.to_dict() for s in scenarios],
        "dialogues": dialogues,
    }


def nothing_answered(report: dict[str, Any]) -> str | None:
    """Why every model failed every context and dialogue (every endpoint down, a wrong
    base_url): `soulray eval` exits 1 on it, as synth does when every scenario failed,
    since such a report measures nothing. None when any reply came back."""
    rows = [r for part in ("replies", "dialogues") for m in report[part].values() for r in m]
    errors = [r["error"] for r in rows]
    if not errors or None in errors:
        return None
    labels = Counter(reason_label(e) for e in errors)
    common = max(labels, key=labels.__getitem__)
    example = next(e for e in errors if reason_label(e) == common)
    return (
        f"nothing was evaluated: all {len(errors)} replies and dialogues failed, most often "
        f"with {example!r}; "
        "check the endpoints of eval.models (and the Seeker's): base_url ends in /v1, the "
        "server is up, the model name is served"
    )


def nothing_judged(report: dict[str, Any]) -> str | None:
    """Why a configured judge scored none of the replies and dialogues it was given, its
    endpoint having failed every one it was asked (down, a wrong base_url): `soulray eval`
    exits 1 on it too, since the report's judge columns are empty. None when the run had no
    judge, gave it nothing, or it scored anything, or a model answered that could not be read
    (a weak judge is the report's to show: its unscored reasons)."""
    summary = report["summary"]
    judges = [
        s["judge"] for part in ("turn", "interactive") for s in summary[part].values() if s["judge"]
    ]
    judged = sum(j["judged"] for j in judges)
    if not judged or any(j["scored"] for j in judges):
        return None
    reasons: Counter[str] = Counter()
    for j in judges:
        reasons.update(j["unscored_reasons"])
    if not all(r.startswith("endpoint") for r in reasons):
        return None
    common, n = reasons.most_common(1)[0]
    return (
        f"the judge scored none of the {judged} replies and dialogues it was given, most "
        f"often for {common!r} ({n}); check eval.judge.endpoint (base_url ends in /v1, the "
        "server is up, the model name is served)"
    )


def write_report(report: dict[str, Any], output_dir: str) -> None:
    """report.json first; report.md and the PNGs are rendered from what was written."""
    from soulray.eval.charts import save_eval_charts
    from soulray.eval.markdown import render_markdown

    storage.makedirs(output_dir)
    path = storage.join(output_dir, "report.json")
    storage.write_text(path, json.dumps(report, indent=1, ensure_ascii=False))
    written = json.loads(storage.read_text(path))
    charts = save_eval_charts(written, output_dir)
    storage.write_text(storage.join(output_dir, "report.md"), render_markdown(written, charts))
