"""The promotion gate behind `--fail-if-worse BASELINE`: the candidate's chosen per-item score
against the baseline's on the same items (contexts, or scenarios for `interactive.*`), as a
paired bootstrap difference. Worse means the whole 95 % CI of (candidate - baseline) is below 0,
so noise alone does not block a rollout, and an equal model always passes. The pairs hold only
items both models have a value for, so a candidate that failed or went unscored on clearly more
items than the baseline (`MISSING_MARGIN` of them more) is refused too: its few paired items
would hide that.
"""

from __future__ import annotations

from typing import Any

from soulray.eval.config import GateConfig
from soulray.eval.stats import paired_difference

MISSING_MARGIN = 0.10  # of the items: more without a value than the baseline is worse


def item_values(report: dict[str, Any], model: str, metric: str) -> dict[str, float]:
    """Item id -> the model's value of `metric` (judge_total, judge.<Dim>, a reference metric,
    or the same prefixed with interactive. for the Seeker-driven dialogues)."""
    if metric.startswith("interactive."):
        rows = report["dialogues"].get(model, [])
        ids = [r["scenario"] for r in rows]
        return _values(ids, rows, metric.removeprefix("interactive."))
    rows = report["replies"].get(model, [])
    return _values([r["context"] for r in rows], rows, metric)


def _values(ids: list[str], rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    out = {}
    for item, row in zip(ids, rows, strict=True):
        scores = (row.get("judge") or {}).get("scores")
        if metric == "judge_total" and scores:
            out[item] = float(sum(scores.values()))
        elif metric.startswith("judge.") and scores and metric[6:] in scores:
            out[item] = float(scores[metric[6:]])
        elif metric in (row.get("metrics") or {}):
            out[item] = float(row["metrics"][metric])
    return out


def not_replied(report: dict[str, Any], model: str, metric: str) -> set[str]:
    """The scenarios of `model`'s dialogues that the Seeker ended before the model replied."""
    from soulray.eval.modes import NO_REPLY

    if not metric.startswith("interactive."):
        return set()
    rows = report["dialogues"].get(model, [])
    return {r["scenario"] for r in rows if (r.get("judge") or {}).get("error") == NO_REPLY}


def check_gate(report: dict[str, Any], baseline: str, gate: GateConfig, seed: int) -> dict:
    """The gate's verdict; a ValueError names a model that is not in the report (the metric's
    name was checked before the run: check_gate_config)."""
    models = [m["name"] for m in report["meta"]["models"]]
    candidate = gate.candidate or models[0]
    if baseline not in models:
        raise ValueError(f"--fail-if-worse {baseline!r}: not a model of this run ({models})")
    if candidate == baseline:
        raise ValueError(
            f"the candidate and the baseline are both {baseline!r}; set eval.gate.candidate "
            "to the model being promoted"
        )
    cand, base = (
        item_values(report, candidate, gate.metric),
        item_values(report, baseline, gate.metric),
    )
    shared = sorted(set(cand) & set(base))
    diff = paired_difference([cand[i] for i in shared], [base[i] for i in shared], seed)
    # With no item scored for both, nothing shows the candidate is not worse: refuse, and say
    # which model lacks values (a judge that scored nothing, an endpoint that failed).
    items = len(item_ids(report, gate.metric))
    # the candidate's items without a value (failed, unscored) beyond the baseline's; a dialogue
    # the Seeker ended before any reply says nothing of the model (modes.NO_REPLY), on either
    # side: each side's missing items are counted without its own
    missing = {
        name: items - len(values) - len(not_replied(report, name, gate.metric))
        for name, values in ((candidate, cand), (baseline, base))
    }
    more_missing = missing[candidate] - missing[baseline] > MISSING_MARGIN * items
    worse = not shared or diff["ci"][1] < 0 or more_missing
    verdict = {
        "candidate": candidate,
        "baseline": baseline,
        "metric": gate.metric,
        "difference": diff,
        "worse": bool(worse),
    }
    if shared and more_missing:
        verdict["more_missing"] = (
            f"{candidate} has a {gate.metric} value on {len(cand)} of {items} items, "
            f"{baseline} on {len(base)}: failed or unscored on more than "
            f"{MISSING_MARGIN:.0%} of the items more (see the report)"
        )
    if not shared:
        verdict["no_paired_items"] = (
            f"no item has a {gate.metric} value for both models ({candidate}: {len(cand)} of "
            f"{items}, {baseline}: {len(base)} of {items}; unscored and failed replies have "
            "none, see the report)"
        )
    return verdict


def item_ids(report: dict[str, Any], metric: str) -> set[str]:
    """Every item the metric is over (contexts, or scenarios for interactive.*)."""
    if metric.startswith("interactive."):
        return {r["scenario"] for rows in report["dialogues"].values() for r in rows}
    return {r["context"] for rows in report["replies"].values() for r in rows}
