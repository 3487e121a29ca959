"""`soulray eval`: the driver. Contexts (Ray Data) -> replies (one Ray task per server, in
parallel) -> reference metrics -> judge and pairwise (one Ray task on the judge endpoint) ->
Seeker-driven dialogues (one Ray task) -> report.json, report.md, PNG charts.

Each phase's task holds the clients of its endpoints, and names on one server (same base_url)
share one bound, so an endpoint's `concurrency` bounds what the server sees. Phases run one after
another: a judge that is also a model under test is never asked by two phases at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import time
from typing import Any

from soulray import storage
from soulray.config import Config, config_to_yaml
from soulray.endpoints import (
    EndpointConfig,
    api_key,
    build_client,
    build_clients,
    close_all,
    endpoint_keys,
    use_keys,
)
from soulray.eval.config import EvalConfig, EvalModel, InteractiveConfig, ModelEndpointConfig
from soulray.eval.contexts import (
    Context,
    contexts_digest,
    sample_contexts,
    sent_history,
    source_files,
)
from soulray.eval.judge import Rubric, load_rubric
from soulray.eval.metrics import reference_scores
from soulray.eval.phases import PhaseStore, answer_settings, fingerprint
from soulray.synth.roles import SEEKER_PROMPTS, check_prompts, load_prompts
from soulray.synth.scenarios import ATTITUDES, Scenario, build_scenarios, make_scenario

log = logging.getLogger("soulray.eval")
TASK_CPUS = 0.1  # the phases wait on endpoints; they must not hold a CPU a replica needs


def warm_up() -> None:
    """Imports what the phase tasks need, in a worker they can reuse."""
    import openai  # noqa: F401

    import soulray.eval.modes  # noqa: F401


def generate_task(
    endpoints: dict[str, ModelEndpointConfig], asks: dict[str, list[Context]]
) -> dict[str, list[dict]]:
    """Each model of one server answers its contexts (one task per server)."""
    from soulray.eval.modes import generate

    async def main() -> dict[str, list[dict]]:
        clients = build_clients(dict(endpoints))
        try:
            done = await asyncio.gather(
                *(generate(c, m, asks[m], endpoints[m].send_strategies) for m, c in clients.items())
            )
            return dict(zip(clients, done, strict=True))
        finally:
            await close_all(clients.values())

    return asyncio.run(main())


def judge_task(
    endpoint: EndpointConfig,
    rubric: Rubric,
    retries: int,
    pairwise: bool,
    contexts: list[Context],
    replies: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    from soulray.eval.modes import judge_pairs, judge_turns

    async def main() -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
        client = build_client(endpoint)
        try:
            scores = await judge_turns(client, rubric, retries, contexts, replies)
            pairs = (
                await judge_pairs(client, rubric, retries, contexts, replies) if pairwise else []
            )
            return scores, pairs
        finally:
            await client.aclose()

    return asyncio.run(main())


def seeker_from_judge(judge: EndpointConfig | None, temperature: float) -> EndpointConfig | None:
    """The judge's endpoint playing the Seeker at `interactive.seeker_temperature` (0.7: a
    varied role-play), whatever the judge's own: the saved config.yaml writes the judge's 0.0
    out, so a rerun from it must not make the Seeker greedy."""
    if judge is None:
        return None
    return EndpointConfig.model_validate(judge.model_dump() | {"temperature": temperature})


def interactive_task(
    cfg: EvalConfig, rubric: Rubric, scenarios: list[Scenario]
) -> dict[str, list[dict[str, Any]]]:
    from soulray.eval.modes import interactive
    from soulray.synth.roles import build_seeker

    ic, judge_cfg = cfg.interactive, cfg.judge.endpoint
    seeker_cfg = ic.seeker or seeker_from_judge(judge_cfg, ic.seeker_temperature)
    assert seeker_cfg is not None  # checked by check_config

    async def main() -> dict[str, list[dict[str, Any]]]:
        # role keys hold a space, which model names cannot
        roles = {" seeker": seeker_cfg} | ({" judge": judge_cfg} if judge_cfg else {})
        clients = build_clients({m.name: m.endpoint for m in cfg.models} | roles)
        models = {m.name: clients[m.name] for m in cfg.models}
        try:
            seeker = build_seeker(clients[" seeker"], ic.seeker_prompts)
            judge = clients.get(" judge")
            strategies = {m.name for m in cfg.models if m.endpoint.send_strategies}
            return await interactive(
                seeker, models, judge, rubric, cfg.judge.retries, scenarios, ic.turns, strategies
            )
        finally:
            await close_all(clients.values())

    return asyncio.run(main())


def interactive_scenarios(ic: InteractiveConfig) -> list[Scenario]:
    """Scenarios from synth's pool, attitudes open / neutral / resistant in turn (so every
    attitude is tried as soon as there are three)."""
    drawn = build_scenarios(ic.scenarios, ic.seed, list(ic.languages))
    out = []
    for i, s in enumerate(drawn):
        fields = dataclasses.asdict(s) | {"attitude": ATTITUDES[i % len(ATTITUDES)]}
        fields.pop("id")
        out.append(make_scenario(**fields))
    return out


def check_config(cfg: EvalConfig, baseline: str | None) -> None:
    """Refuse, before any request, what would fail later."""
    if not cfg.models:
        raise ValueError("eval.models is empty; list the models under test (name + endpoint)")
    if cfg.contexts is None and not cfg.interactive.enabled:
        raise ValueError("nothing to evaluate: set eval.contexts and/or eval.interactive.enabled")
    if cfg.interactive.enabled and cfg.interactive.seeker is None and cfg.judge.endpoint is None:
        raise ValueError(
            "eval.interactive needs a Seeker: set eval.interactive.seeker (an endpoint) or "
            "eval.judge.endpoint (which then plays the Seeker too)"
        )
    load_rubric(cfg.judge.rubric)  # a typo of a built-in name or a bad file: before Ray starts
    if cfg.contexts is not None:
        source_files(cfg.contexts)  # a bad prepared_dir or input path: before Ray starts
    if cfg.interactive.enabled:
        interactive_scenarios(cfg.interactive)  # the pool makes enough of them
        # the file is there, parses, and has the Seeker's templates in every language played
        key = "eval.interactive.seeker_prompts"
        prompts = load_prompts(cfg.interactive.seeker_prompts, key)
        check_prompts(prompts, list(cfg.interactive.languages), key, SEEKER_PROMPTS)
    names = [m.name for m in cfg.models]
    if baseline is not None and (baseline not in names or len(names) < 2):
        raise ValueError(
            f"--fail-if-worse {baseline!r} must name one of eval.models ({names}) "
            "and there must be a candidate beside it"
        )
    if baseline is not None:
        check_gate_config(cfg, baseline, names)
    for ep in endpoints_of(cfg):
        api_key(ep)  # its environment variable is set


def endpoints_of(cfg: EvalConfig) -> list[EndpointConfig]:
    """Every endpoint the run calls: the models, the judge and the Seeker."""
    found = [m.endpoint for m in cfg.models] + [cfg.judge.endpoint, cfg.interactive.seeker]
    return [ep for ep in found if ep is not None]


def check_gate_config(cfg: EvalConfig, baseline: str, names: list[str]) -> None:
    """The gate's candidate and metric, checked before the run (check_gate would find them
    missing only once every reply is in)."""
    from soulray.eval.report import TURN_METRICS

    candidate = cfg.gate.candidate or names[0]  # EvalConfig has checked it names a model
    if candidate == baseline:
        raise ValueError(
            f"the candidate and the baseline are both {baseline!r}; set eval.gate.candidate "
            f"to the model being promoted (one of {[n for n in names if n != baseline]})"
        )
    metric = cfg.gate.metric
    interactive = metric.startswith("interactive.")
    base = metric.removeprefix("interactive.")
    dims = [d.name for d in load_rubric(cfg.judge.rubric).dimensions]
    judged = ["judge_total", *(f"judge.{d}" for d in dims)]
    # per-reply scores only; not length (shorter is not worse) nor Distinct-n (a statistic of
    # all replies together, with no per-item value to pair)
    known = judged if interactive else [*judged, *(m for m in TURN_METRICS if m != "length")]
    if base not in known:
        close = difflib.get_close_matches(base, known, 1)
        prefix = "interactive." if interactive else ""
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise ValueError(
            f"eval.gate.metric {metric!r} is not a metric of this run{hint}; "
            f"use one of {known}" + ("" if interactive else ", or interactive.<judge metric>")
        )
    if base in judged and cfg.judge.endpoint is None:
        raise ValueError(f"eval.gate.metric {metric!r} needs a judge: set eval.judge.endpoint")
    if interactive and not cfg.interactive.enabled:
        raise ValueError(f"eval.gate.metric {metric!r} needs eval.interactive.enabled: true")
    if not interactive and cfg.contexts is None:
        raise ValueError(f"eval.gate.metric {metric!r} needs eval.contexts (turn-based replies)")


class PhaseClock:
    """Seconds per phase, for report.json's meta (where the time of a run went)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 3)
        self.last = now


def add_reference_metrics(contexts: list[Context], rows: list[dict[str, Any]]) -> None:
    for ctx, row in zip(contexts, rows, strict=True):
        if row["text"] is not None:
            row["metrics"] = reference_scores(row["text"], ctx.reference, ctx.language)


def keyed(keys: dict[str, str], fn: Any, *args: Any) -> Any:
    """A phase task: the API keys read on the driver, then `fn(*args)`."""
    use_keys(keys)
    return fn(*args)


def reply_fingerprints(models: list[EvalModel], contexts: list[Context]) -> dict[str, str]:
    """Per model, what its saved replies answered: its answer settings and the histories it is
    sent (with the earlier replies' strategies under send_strategies). A change of a context's
    language or reference asks nothing again."""
    return {
        m.name: fingerprint(
            answer_settings(m.endpoint), histories(contexts, m.endpoint.send_strategies)
        )
        for m in models
    }


def histories(contexts: list[Context], strategies: bool) -> str:
    """A fingerprint of the contexts' histories as sent (with their strategies or without)."""
    return fingerprint([(c.id, sent_history(c.messages, strategies)) for c in contexts])


def run_turn_mode(
    e: EvalConfig, rubric: Rubric, call: Any, clock: PhaseClock, store: PhaseStore
) -> tuple[
    list[Context], dict[str, list[dict[str, Any]]], dict[str, list[Any]], list[dict[str, Any]]
]:
    """Contexts -> every model's replies (a task per server, in parallel) -> reference metrics
    -> judge scores and pairwise verdicts (one task on the judge endpoint). Each model's replies
    and the judge's verdicts are saved as they finish (see phases.py)."""
    import ray

    if e.contexts is None:
        return [], {}, {}, []
    # the phase tasks' workers start (and import the client) while the contexts are read
    warm = [call(warm_up) for _ in {m.endpoint.base_url for m in e.models}]
    contexts = sample_contexts(e.contexts)
    ray.get(warm)
    clock.done("contexts_s")
    log.info("%d contexts, %d model(s)", len(contexts), len(e.models))
    # the contexts as the judge reads them: a change of a language or reference asks nothing again
    asked = histories(contexts, False)
    replies: dict[str, list[dict[str, Any]]] = {}
    todo: dict[str, list[int]] = {}  # per model, the contexts to ask (all, or the failed)
    fps = reply_fingerprints(e.models, contexts)
    for m in e.models:
        saved = store.load("replies", m.name, fps[m.name], announce=False)
        if saved is None:
            todo[m.name] = list(range(len(contexts)))
            continue
        replies[m.name] = saved
        failed = [i for i, row in enumerate(saved) if row["error"] is not None]
        log.info(
            "eval --resume: reused %d of the %d saved replies of %s%s",
            len(saved) - len(failed),
            len(saved),
            m.name,
            f"; asking again for the {len(failed)} that failed" if failed else "",
        )
        if failed:  # a timeout or a server that was down: asked again, not reused
            todo[m.name] = failed
    reasked = [name for name in todo if name in replies]  # saved, and some asked again
    saved_texts = {name: [row.get("text") for row in rows] for name, rows in replies.items()}
    servers: dict[str, dict[str, ModelEndpointConfig]] = {}
    for m in e.models:
        if m.name in todo:
            servers.setdefault(m.endpoint.base_url, {})[m.name] = m.endpoint
    pending = [
        call(generate_task, eps, {n: [contexts[i] for i in todo[n]] for n in eps})
        for eps in servers.values()
    ]
    while pending:  # each server's replies saved as soon as they are in
        [ref], pending = ray.wait(pending)
        for name, rows in ray.get(ref).items():
            merged = list(replies.get(name) or [{}] * len(contexts))  # {}: each asked now
            for i, row in zip(todo[name], rows, strict=True):
                merged[i] = row
            store.save("replies", name, fps[name], merged)
            replies[name] = merged
    replies = {m.name: replies[m.name] for m in e.models}
    clock.done("generate_s")
    for rows in replies.values():
        add_reference_metrics(contexts, rows)
    clock.done("metrics_s")
    if e.judge.endpoint is None:
        return contexts, replies, {}, []
    pairwise = e.judge.pairwise and len(e.models) > 1

    def judge_fingerprint(texts: dict[str, list[Any]]) -> str:
        return fingerprint(
            answer_settings(e.judge.endpoint),
            rubric.model_dump(),
            e.judge.retries,
            pairwise,
            asked,
            [m.name for m in e.models],  # the pairs' order
            texts,
        )

    judged = judge_fingerprint({n: [row["text"] for row in rows] for n, rows in replies.items()})
    # stale only because replies were asked again (the saved judge scored the saved replies):
    # said so, not warned about as other settings
    changed = None
    if reasked and store.saved_fingerprint("judge", "all") == judge_fingerprint(saved_texts):
        changed = f"replies of {', '.join(reasked)} were asked again"

    def endpoint_failed(saved: dict[str, Any]) -> bool:
        return judge_endpoint_failed(saved["scores"], saved["pairs"])

    saved = store.load("judge", "all", judged, changed=changed, failed=endpoint_failed)
    if saved is None:
        args = (e.judge.endpoint, rubric, e.judge.retries, pairwise, contexts, replies)
        scores, pairs = ray.get(call(judge_task, *args))
        store.save("judge", "all", judged, {"scores": scores, "pairs": pairs})
    else:
        scores, pairs = saved["scores"], saved["pairs"]
    clock.done("judge_s")
    return contexts, replies, scores, pairs


def judge_endpoint_failed(scores: dict[str, list[Any]], pairs: list[dict[str, Any]]) -> bool:
    """Whether a judge phase has items the judge's endpoint failed (not its unusable answers):
    such a phase is not reused, since asking again may now succeed."""
    judgements = [j for rows in scores.values() for j in rows if j is not None]
    for p in pairs:
        judgements += [c[order] for c in p["comparisons"] for order in ("first", "swapped")]
    return any(str(j.get("error") or "").startswith("endpoint:") for j in judgements)


def failed_dialogues(
    dialogues: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per model, the saved dialogues with a failure asking again may mend: those a model's
    or the Seeker's endpoint cut short (played again), and finished ones whose judge's
    endpoint failed (judged again, as for the judge phase); models without one are left out."""
    replay, rejudge = {}, {}
    for model, ds in dialogues.items():
        if again := [i for i, d in enumerate(ds) if d["error"]]:
            replay[model] = again
        judge_failed = [
            i
            for i, d in enumerate(ds)
            if not d["error"] and judge_endpoint_failed({model: [d.get("judge")]}, [])
        ]
        if judge_failed:
            rejudge[model] = judge_failed
    return replay, rejudge


def counted(what: str, indices: dict[str, list[int]]) -> str:
    """How many dialogues, and per model: 'the 3 <what> (good: 2, bad: 1)'."""
    per_model = ", ".join(f"{m}: {len(i)}" for m, i in indices.items())
    return f"the {sum(map(len, indices.values()))} {what} ({per_model})"


def rejudge_task(
    cfg: EvalConfig, rubric: Rubric, records: list[dict[str, Any]]
) -> list[dict[str, Any] | None]:
    """The judge's verdicts on dialogues played earlier (their judge's endpoint had failed)."""
    from soulray.eval.modes import Progress, judge_dialogue, tracked

    async def main() -> list[dict[str, Any] | None]:
        assert cfg.judge.endpoint is not None  # a judge failed them
        clients = build_clients({" judge": cfg.judge.endpoint})
        judge, retries = clients[" judge"], cfg.judge.retries
        try:
            jobs = [judge_dialogue(judge, rubric, retries, r) for r in records]
            return await tracked(jobs, Progress("dialogues judged again", len(jobs)))
        finally:
            await close_all(clients.values())

    return asyncio.run(main())


def run_interactive(
    e: EvalConfig, rubric: Rubric, call: Any, store: PhaseStore
) -> tuple[list[Scenario], dict[str, list[dict[str, Any]]]]:
    """Seeker-driven dialogues with every model (one task), saved when done."""
    import ray

    scenarios = interactive_scenarios(e.interactive)
    # the Seeker's temperature is in its answer settings (dialogues saved before
    # seeker_temperature existed still match)
    seeker = e.interactive.seeker or seeker_from_judge(
        e.judge.endpoint, e.interactive.seeker_temperature
    )
    fp = fingerprint(
        e.interactive.model_dump(mode="json", exclude={"seeker", "seeker_temperature"}),
        answer_settings(seeker),
        {m.name: answer_settings(m.endpoint) for m in e.models},
        answer_settings(e.judge.endpoint),
        rubric.model_dump(),
        e.judge.retries,
        [dataclasses.asdict(s) for s in scenarios],
        load_prompts(e.interactive.seeker_prompts, "eval.interactive.seeker_prompts"),
    )
    dialogues = store.load("dialogues", "all", fp, announce=False)
    if dialogues is None:
        dialogues = ray.get(call(interactive_task, e, rubric, scenarios))
        store.save("dialogues", "all", fp, dialogues)
        return scenarios, dialogues
    again, rejudge = failed_dialogues(dialogues)
    kept = sum(map(len, dialogues.values())) - sum(map(len, again.values()))
    if not (again or rejudge):
        log.info("eval --resume: reused the %d saved dialogues", kept)
        return scenarios, dialogues
    # only those are played or judged again: the others keep their dialogues and scores
    said = [f"kept {kept} saved dialogues"]
    if again:
        said.append("playing again " + counted("an endpoint failed", again))
    if rejudge:
        said.append("judging again " + counted("whose judge's endpoint failed", rejudge))
    log.info("eval --resume: %s", "; ".join(said))
    if kept == 0:  # none reused: the report must not say so
        store.forget_reuse("dialogues", "all")
    by_name = {m.name: m for m in e.models}
    refs = {
        model: call(
            interactive_task,
            e.model_copy(update={"models": [by_name[model]]}),
            rubric,
            [scenarios[i] for i in idx],
        )
        for model, idx in again.items()
    }
    records = [dialogues[m][i] for m, idx in rejudge.items() for i in idx]
    verdicts = iter(ray.get(call(rejudge_task, e, rubric, records)) if records else [])
    for model, idx in rejudge.items():
        for i in idx:
            dialogues[model][i]["judge"] = next(verdicts)
    for model, ref in refs.items():
        for i, played in zip(again[model], ray.get(ref)[model], strict=True):
            dialogues[model][i] = played
    store.save("dialogues", "all", fp, dialogues)
    return scenarios, dialogues


def run_eval(cfg: Config, fail_if_worse: str | None = None, resume: bool = False) -> dict[str, Any]:
    """The whole evaluation on the current Ray cluster; returns the report (also written).
    With `fail_if_worse`, the report carries the gate's verdict against that model; with
    `resume`, phases an earlier run saved from the same settings are reused (phases.py)."""
    import ray

    from soulray.eval.gate import check_gate
    from soulray.eval.report import build_report, write_report

    e = cfg.eval
    check_config(e, fail_if_worse)  # `soulray eval` checked it before starting Ray
    started = time.time()
    rubric = load_rubric(e.judge.rubric)
    task = ray.remote(num_cpus=TASK_CPUS, max_retries=2)(keyed)  # a lost worker: the phase again
    keys = endpoint_keys(endpoints_of(e))

    def call(fn: Any, *args: Any) -> Any:
        return task.remote(keys, fn, *args)

    clock = PhaseClock()
    store = PhaseStore(e.output_dir, resume)
    dialogues: dict[str, list[dict[str, Any]]] = {}
    scenarios: list[Scenario] = []
    try:
        contexts, replies, scores, pairs = run_turn_mode(e, rubric, call, clock, store)
        if e.interactive.enabled:
            scenarios, dialogues = run_interactive(e, rubric, call, store)
            clock.done("interactive_s")
    except BaseException:
        if store.saved:
            log.error(
                "the finished phases are saved in %s (%s): run the same command with --resume "
                "to reuse them",
                store.dir,
                ", ".join(store.saved),
            )
        raise
    meta = {
        "models": [m.model_dump(mode="json") for m in e.models],
        "judge": e.judge.model_dump(mode="json"),
        "contexts_digest": contexts_digest(contexts),
        "seconds": round(time.time() - started, 2),
        "phases": clock.phases,
        "reused": store.reused,  # saved by an earlier run, taken with --resume
    }
    report = build_report(e, rubric, contexts, replies, scores, pairs, dialogues, scenarios, meta)
    if fail_if_worse is not None:
        report["gate"] = check_gate(report, fail_if_worse, e.gate, e.seed)
    write_report(report, e.output_dir)
    storage.write_text(storage.join(e.output_dir, "config.yaml"), config_to_yaml(cfg))
    return report
