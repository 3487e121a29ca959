"""PNG charts (matplotlib, headless): scores per model and dimension with 95 % CI bars,
reply-length histograms, pairwise outcomes, strategy distributions; and a training run's curves.
Every chart is drawn from report.json / metrics.jsonl values, written through `storage`."""

from __future__ import annotations

import io
from typing import Any

from soulray import storage
from soulray.eval.metrics import REFERENCE_METRICS, tokenize


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in Ray workers
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, output_dir: str, name: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    storage.write_bytes(storage.join(output_dir, name), buffer.getvalue())
    return name


def grouped_bars(title: str, groups: list[str], series: dict[str, list[dict[str, Any]]]) -> Any:
    """One bar per (group, series) at the summary's mean, with its CI as the error bar."""
    plt = _pyplot()
    width_in = min(14.0, max(6.0, 0.5 * len(groups) * max(1, len(series))))
    fig, ax = plt.subplots(figsize=(width_in, 4))
    width = 0.8 / max(1, len(series))
    for k, (label, stats) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(groups))]
        means = [s["mean"] or 0.0 for s in stats]
        lows = [(s["mean"] - s["ci"][0]) if s["mean"] is not None else 0.0 for s in stats]
        highs = [(s["ci"][1] - s["mean"]) if s["mean"] is not None else 0.0 for s in stats]
        ax.bar(xs, means, width, label=label, yerr=[lows, highs], capsize=3)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_title(title)
    ax.legend()
    return fig


def judge_chart(title: str, per_model: dict[str, Any], output_dir: str, name: str) -> str | None:
    scored = {
        m: s["judge"]["scores"]
        for m, s in per_model.items()
        if s.get("judge") and s["judge"]["scores"]["total"]["n"]
    }  # a model with no scored answer has no bar (the report's table counts it)
    if not scored:
        return None
    dims = [k for k in next(iter(scored.values())) if k != "total"]
    series = {m: [v[d] for d in dims] for m, v in scored.items()}
    return save_figure(grouped_bars(title, dims, series), output_dir, name)


def length_histogram(report: dict[str, Any], output_dir: str) -> str | None:
    plt = _pyplot()
    contexts = report["contexts"]
    if not contexts:
        return None
    lengths = {"reference": [len(tokenize(c["reference"], c["language"])) for c in contexts]}
    for model, rows in report["replies"].items():
        lengths[model] = [r["metrics"]["length"] for r in rows if r.get("metrics")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(list(lengths.values()), bins=20, label=list(lengths), histtype="step", linewidth=1.5)
    ax.set_xlabel("reply length (tokens: zh characters, en words)")
    ax.set_ylabel("replies")
    ax.set_title("Reply lengths")
    ax.legend()
    return save_figure(fig, output_dir, "reply_lengths.png")


def pairwise_chart(pairs: list[dict[str, Any]], output_dir: str) -> str | None:
    scored = [p for p in pairs if p["scored"]]
    if not scored:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(scored)))
    labels = [f"{p['model_1']} vs {p['model_2']}" for p in scored]
    left = [0.0] * len(scored)
    for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
        rates = [p[f"{key}_rate"] for p in scored]
        ax.barh(labels, rates, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, rates, strict=True)]
    ax.set_xlim(0, 1)
    ax.set_title("Pairwise (first model's outcome, both orders asked)")
    ax.legend(loc="lower right")
    return save_figure(fig, output_dir, "pairwise.png")


def strategy_chart(strategies: dict[str, Any] | None, output_dir: str) -> str | None:
    if not strategies:
        return None
    dists = {"reference": strategies["reference"], **strategies["models"]}
    names = sorted({k for d in dists.values() for k in d})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(names) * len(dists)), 4))
    width = 0.8 / len(dists)
    for k, (label, counts) in enumerate(dists.items()):
        total = sum(counts.values()) or 1
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, [counts.get(n, 0) / total for n in names], width, label=label)
    ax.set_xticks([i + width * (len(dists) - 1) / 2 for i in range(len(names))], names)
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel("share of replies")
    ax.set_title("Strategy use")
    ax.legend()
    return save_figure(fig, output_dir, "strategies.png")


def save_eval_charts(report: dict[str, Any], output_dir: str) -> list[str]:
    """Every chart the report has data for; returns the file names (relative to output_dir)."""
    s = report["summary"]
    charts: list[str | None] = []
    if s["turn"]:
        series = {m: [v["metrics"][k] for k in REFERENCE_METRICS] for m, v in s["turn"].items()}
        labels = [k.replace("_", "-").upper() for k in REFERENCE_METRICS]
        fig = grouped_bars("Reference metrics (0-100)", labels, series)
        charts.append(save_figure(fig, output_dir, "reference_metrics.png"))
        charts.append(
            judge_chart("Judge scores per dimension", s["turn"], output_dir, "judge_scores.png")
        )
        charts.append(length_histogram(report, output_dir))
    charts.append(pairwise_chart(s["pairwise"], output_dir))
    charts.append(
        judge_chart(
            "Dialogue scores (Seeker-driven)",
            s["interactive"],
            output_dir,
            "interactive_scores.png",
        )
    )
    charts.append(strategy_chart(s["strategies"], output_dir))
    made = [c for c in charts if c]
    for stale in set(EVAL_CHARTS) - set(made):  # a reused output_dir: no chart of another run
        storage.delete_file(storage.join(output_dir, stale))
    return made


EVAL_CHARTS = (
    "reference_metrics.png",
    "judge_scores.png",
    "reply_lengths.png",
    "pairwise.png",
    "interactive_scores.png",
    "strategies.png",
)


def save_curve(
    series: dict[str, tuple[list[float], list[float]]], ylabel: str, output_dir: str, name: str
) -> str:
    """One training curve PNG: label -> (steps, values)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, output_dir, name)
