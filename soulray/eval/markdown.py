"""report.md, rendered from a loaded report.json only (never from in-memory results), so the
numbers a reader sees are the numbers a machine reads. Every figure goes through `num`."""

from __future__ import annotations

from typing import Any

from soulray.eval.report import TURN_METRICS

METRIC_NAMES = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "rouge_1": "ROUGE-1",
    "rouge_2": "ROUGE-2",
    "rouge_l": "ROUGE-L",
    "length": "length",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
}


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def with_ci(s: dict[str, Any]) -> str:
    """'mean [low, high]'; the mean alone for a statistic without a CI (Distinct-n)."""
    if s["mean"] is None:
        return "n/a"
    if s["ci"][0] is None:
        return num(s["mean"])
    return f"{num(s['mean'])} [{num(s['ci'][0])}, {num(s['ci'][1])}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def inline(text: str | None, limit: int = 400) -> str:
    if text is None:
        return "_(no reply)_"
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    flat = flat.replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + " …"


def turn_section(turn: dict[str, Any]) -> list[str]:
    metrics = [*TURN_METRICS, "distinct_1", "distinct_2"]
    out = ["## Turn-based, against the counselor's reply", ""]
    out += [
        "Mean [95 % bootstrap CI]; BLEU and ROUGE 0-100, length in tokens; Distinct-n (0-1) is "
        "over all of a model's replies, without a CI (resampling repeats replies).",
        "",
    ]
    rows = [
        [m, str(v["replies"]), str(v["failed"]), *(with_ci(v["metrics"][k]) for k in metrics)]
        for m, v in turn.items()
    ]
    out += table(["model", "replies", "failed", *(METRIC_NAMES[k] for k in metrics)], rows)
    failed = [
        f"{m}: " + ", ".join(f"{k} {n}" for k, n in v["failure_reasons"].items())
        for m, v in turn.items()
        if v["failure_reasons"]
    ]
    out += (
        [f"Failed replies (after the endpoint's retries): {'; '.join(failed)}", ""]
        if failed
        else []
    )
    return out + judge_table("Judge scores", turn)


def judge_table(title: str, per_model: dict[str, Any]) -> list[str]:
    judged = {m: v["judge"] for m, v in per_model.items() if v.get("judge")}
    if not judged:
        return []
    dims = list(next(iter(judged.values()))["scores"])
    out = [f"### {title}", ""]
    out += ["Scored answers only; unscored ones (after the retries) are counted, not dropped.", ""]
    rows = [
        [m, str(j["scored"]), str(j["unscored"]), *(with_ci(j["scores"][d]) for d in dims)]
        + [", ".join(f"{k}: {n}" for k, n in j["unscored_reasons"].items()) or "-"]
        for m, j in judged.items()
    ]
    return out + table(["model", "scored", "unscored", *dims, "unscored because"], rows)


def pairwise_section(pairs: list[dict[str, Any]]) -> list[str]:
    if not pairs:
        return []
    out = ["## Pairwise", "", "Each comparison asked twice with the replies' order swapped; "]
    out[-1] += "a win needs the judge to prefer the model beyond a tie over both orders."
    out.append("")
    rows = [
        [
            f"{p['model_1']} vs {p['model_2']}",
            str(p["compared"]),
            str(p["unscored"]),
            *(f"{num(p[f'{k}_rate'])} ({p[k]})" for k in ("win", "tie", "loss")),
            with_ci(p["score"]),
        ]
        for p in pairs
    ]
    header = ["pair", "compared", "unscored", "win", "tie", "loss", "first model's points"]
    return out + table(header, rows)


def dialogue_example(dialogues: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The first scenario's dialogue with each model, as the judge read it."""
    out = []
    for model, records in dialogues.items():
        if not records:
            continue
        r = records[0]
        judge = r.get("judge") or {}
        total = f", judge total {sum(judge['scores'].values())}" if judge.get("scores") else ""
        out += [f"### {model} with {r['scenario']} ({r['attitude']}, {r['language']}){total}", ""]
        for m in r["messages"]:
            out += [f"> **{'Seeker' if m['role'] == 'user' else model}:** {inline(m['content'])}"]
            out += [">"]
        out += [f"_(ended: {r['error']})_" if r["error"] else "", ""]
    return out


def interactive_section(
    interactive: dict[str, Any], dialogues: dict[str, list[dict[str, Any]]]
) -> list[str]:
    if not interactive:
        return []
    out = ["## Interactive (Seeker-driven dialogues, judged as a whole)", ""]
    attitudes = sorted({a for v in interactive.values() for a in v["by_attitude"]})
    rows = [
        [m, str(v["dialogues"]), str(v["failed"]), with_ci(v["model_turns"])]
        + [with_ci(v["by_attitude"][a]) if a in v["by_attitude"] else "n/a" for a in attitudes]
        for m, v in interactive.items()
    ]
    header = ["model", "dialogues", "failed", "model turns", *(f"total ({a})" for a in attitudes)]
    out += table(header, rows) + judge_table("Dialogue judge scores", interactive)
    return out + dialogue_example(dialogues)


def strategy_section(strategies: dict[str, Any] | None) -> list[str]:
    if not strategies:
        return []
    dists = {"reference": strategies["reference"], **strategies["models"]}
    names = sorted({k for d in dists.values() for k in d})
    totals = {k: sum(d.values()) or 1 for k, d in dists.items()}
    rows = [[n, *(num(d.get(n, 0) / totals[k]) for k, d in dists.items())] for n in names]
    rows.append(["total variation from reference", "0.00"])
    rows[-1] += [num(strategies["tvd"].get(m)) for m in strategies["models"]]
    out = ["## Strategy use (share of replies)", ""]
    return out + table(["strategy", *dists], rows)


def examples_section(report: dict[str, Any]) -> list[str]:
    n = report["meta"]["examples"]
    models = list(report["replies"])
    out = ["## Side by side", ""] if n and report["contexts"] else []
    for i, ctx in enumerate(report["contexts"][:n]):
        out += [f"### {ctx['id']}", ""]
        for m in ctx["messages"][-4:]:
            who = {"user": "Seeker", "assistant": "Supporter"}.get(m["role"])
            out += [f"> **{who}:** {inline(m['content'])}", ">"] if who else []
        out += [f"- **reference:** {inline(ctx['reference'])}"]
        for model in models:
            row = report["replies"][model][i]
            judge = row.get("judge") or {}
            total = sum(judge["scores"].values()) if judge.get("scores") else None
            score = f" (judge total {num(total)})" if total is not None else ""
            out.append(f"- **{model}**{score}: {inline(row['text'])}")
        out.append("")
    return out


def render_markdown(report: dict[str, Any], charts: list[str]) -> str:
    meta, s = report["meta"], report["summary"]
    out = ["# Evaluation report", ""]
    out += [f"- models: {', '.join(m['name'] for m in meta['models'])}"]
    out += [f"- contexts: {len(report['contexts'])} (set {meta['contexts_digest']})"]
    judged = bool(meta.get("judge", {}).get("endpoint"))
    out += [f"- rubric: {meta['rubric']['title']}"] if judged else ["- judge: none"]
    if meta.get("reused"):
        out += [f"- reused from an earlier run (--resume): {', '.join(meta['reused'])}"]
    out += [f"- seconds: {num(meta['seconds'])}", ""]
    if s["turn"]:
        out += turn_section(s["turn"])
    out += pairwise_section(s["pairwise"])
    out += interactive_section(s["interactive"], report["dialogues"])
    out += strategy_section(s["strategies"]) + examples_section(report)
    if "gate" in report:
        out += gate_lines(report["gate"])
    out += ["## Charts", ""] + [f"![{c}]({c})" for c in charts] + [""]
    return "\n".join(out)


def gate_lines(gate: dict[str, Any]) -> list[str]:
    if "no_paired_items" in gate:
        line = (
            f"{gate['candidate']} vs {gate['baseline']} on {gate['metric']}: promotion refused: "
            f"{gate['no_paired_items']}."
        )
    elif "more_missing" in gate:
        line = (
            f"{gate['candidate']} vs {gate['baseline']} on {gate['metric']}: promotion refused: "
            f"{gate['more_missing']}; difference {with_ci(gate['difference'])} over "
            f"{gate['difference']['n']} paired items."
        )
    else:
        verdict = "WORSE: promotion refused" if gate["worse"] else "not worse"
        line = (
            f"{gate['candidate']} vs {gate['baseline']} on {gate['metric']}: difference "
            f"{with_ci(gate['difference'])} over {gate['difference']['n']} paired items: "
            f"{verdict}."
        )
    return ["## Promotion gate", "", line, ""]


def render_summary(report: dict[str, Any], output_dir: str) -> str:
    """The few lines `soulray eval` prints: per model the headline numbers, then the files."""
    s, lines = report["summary"], []
    for model, v in s["turn"].items():
        judge = v["judge"]
        total = f", judge total {with_ci(judge['scores']['total'])}" if judge else ""
        unscored = f" ({judge['unscored']} unscored)" if judge else ""
        lines.append(
            f"{model}: BLEU-4 {with_ci(v['metrics']['bleu_4'])}, ROUGE-L "
            f"{with_ci(v['metrics']['rouge_l'])}{total}{unscored}, {v['failed']} failed"
        )
    for p in s["pairwise"]:
        lines.append(
            f"{p['model_1']} vs {p['model_2']}: win {num(p['win_rate'])} tie "
            f"{num(p['tie_rate'])} loss {num(p['loss_rate'])} ({p['unscored']} unscored)"
        )
    for model, v in s["interactive"].items():
        total = (
            f"judge total {with_ci(v['judge']['scores']['total'])}"
            if v["judge"]
            else "no dialogue judged"
        )
        lines.append(f"{model} dialogues: {v['dialogues']} ({v['failed']} failed), {total}")
    if "gate" in report:
        lines += gate_lines(report["gate"])[2:3]
    lines.append(f"wrote {output_dir}/report.json, report.md and charts")
    return "\n".join(lines)
