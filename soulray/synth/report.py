"""synth_report.json and its PNG charts, computed from everything in the output directory
(earlier runs included), so the report always describes the shards that are there."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from soulray.endpoints import reason_key
from soulray.synth.output import REPORT_FILE, OutputStore, StoredState

PHASES = ("early", "middle", "late")  # thirds of a dialogue's Supporter turns


def build_report(state: StoredState, strategies: list[str], run: dict[str, Any]) -> dict[str, Any]:
    records = state.records
    replies = [m for r in records for m in r["messages"] if m["role"] == "assistant"]
    counts: Counter[str] = Counter()
    for r in records:
        counts.update(r["metadata"]["counts"])
    return {
        "dialogues": {
            "written": len(records),
            "dropped": dict(sorted(Counter(state.dropped.values()).items())),
            # by label ('http_503'), one full reason each; every reason is in failed.jsonl
            "failed": dict(sorted(Counter(map(reason_key, state.failed.values())).items())),
            "failed_example": {reason_key(r): r for r in sorted(state.failed.values())},
        },
        "utterances": sum(len(r["messages"]) for r in records),
        "turns_per_dialogue": describe([r["metadata"]["turns"] for r in records], histogram=True),
        "stop_reasons": dict(
            sorted(Counter(r["metadata"]["stop_reason"] for r in records).items())
        ),
        "strategies": {
            "overall": ordered(Counter(m["strategy"] for m in replies), strategies),
            "by_stage": by_key(replies, "stage", strategies),
            "by_phase": by_phase(records, strategies),
        },
        "reply_chars": {
            "supporter": lengths_by_language(records, "assistant"),
            "seeker": lengths_by_language(records, "user"),
        },
        "quality": dict(sorted(counts.items())),  # over the written dialogues
        "quality_dropped": dict(sorted(state.dropped_counts.items())),  # over the dropped ones
        "run": run,
    }


def describe(values: list[int], histogram: bool = False) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    out: dict[str, Any] = {
        "count": len(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }
    if histogram:
        out["histogram"] = {str(k): v for k, v in sorted(Counter(values).items())}
    return out


def ordered(counter: Counter[str], names: list[str]) -> dict[str, int]:
    """Counts in taxonomy order, every strategy present (0 when unused)."""
    return {name: counter.get(name, 0) for name in names}


def by_key(replies: list[dict[str, Any]], key: str, names: list[str]) -> dict[str, dict[str, int]]:
    groups: dict[str, Counter[str]] = {}
    for m in replies:
        groups.setdefault(m[key], Counter())[m["strategy"]] += 1
    return {k: ordered(v, names) for k, v in sorted(groups.items())}


def by_phase(records: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, int]]:
    groups = {phase: Counter[str]() for phase in PHASES}
    for r in records:
        replies = [m for m in r["messages"] if m["role"] == "assistant"]
        for i, m in enumerate(replies):
            groups[PHASES[3 * i // len(replies)]][m["strategy"]] += 1
    return {phase: ordered(c, names) for phase, c in groups.items()}


def lengths_by_language(records: list[dict[str, Any]], role: str) -> dict[str, dict[str, Any]]:
    by_lang: dict[str, list[int]] = {}
    for r in records:
        lang = r["metadata"]["scenario"]["language"]
        by_lang.setdefault(lang, []).extend(
            len(m["content"]) for m in r["messages"] if m["role"] == role
        )
    return {lang: describe(v) for lang, v in sorted(by_lang.items())}


def save_report(store: OutputStore, report: dict[str, Any], charts: bool) -> list[Path]:
    """Write synth_report.json (and the charts); return the paths written."""
    text = json.dumps(report, ensure_ascii=False, indent=2)
    paths = [store.write_meta(REPORT_FILE, text.encode())]
    if charts and report["dialogues"]["written"]:
        paths += save_charts(store.meta, report)
    return paths


def save_charts(folder: Path, report: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    paths = []
    strategies = report["strategies"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(strategies["overall"])
    ax.barh(names, list(strategies["overall"].values()), color="#4c72b0")
    ax.invert_yaxis()
    ax.set(title="Strategies used by the Supporter", xlabel="replies")
    paths.append(save(fig, folder / "strategies.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(PHASES)
    for i, phase in enumerate(PHASES):
        values = list(strategies["by_phase"][phase].values())
        ax.bar([x + i * width for x in range(len(names))], values, width, label=phase)
    ax.set_xticks([x + width for x in range(len(names))], names, rotation=30, ha="right")
    ax.set(title="Strategies by dialogue phase (thirds of the replies)", ylabel="replies")
    ax.legend()
    paths.append(save(fig, folder / "strategies_by_phase.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    hist = report["turns_per_dialogue"]["histogram"]
    ax.bar([int(k) for k in hist], list(hist.values()), color="#55a868")
    ax.set(title="Supporter turns per dialogue", xlabel="turns", ylabel="dialogues")
    paths.append(save(fig, folder / "turns.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    labels, means = [], []
    for role, by_lang in report["reply_chars"].items():
        for lang, stats in by_lang.items():
            labels.append(f"{role} ({lang})")
            means.append(stats.get("mean", 0))
    ax.bar(labels, means, color="#c44e52")
    ax.set(title="Mean utterance length", ylabel="characters")
    paths.append(save(fig, folder / "reply_lengths.png"))
    return paths


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
