"""`soulray synth`: scenarios -> Ray Data actor pool of role-play workers -> shards + report.

Each actor keeps one asyncio loop on a thread and takes up to `dialogues_per_actor` scenarios
at once (Ray Data's concurrent calls per actor, one scenario per block), so a few CPU actors
keep a GPU endpoint fleet busy. The driver consumes results as they finish, drops near
duplicates, and appends each dialogue to the output at once, so the output is resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from soulray.config import Config, config_to_yaml
from soulray.endpoints import (
    EndpointError,
    api_key,
    build_clients,
    close_all,
    endpoint_keys,
    reason_key,
    use_keys,
)
from soulray.synth.config import SynthConfig
from soulray.synth.near_dupes import NearDuplicateIndex
from soulray.synth.output import OutputStore, StoredState, report_path
from soulray.synth.report import build_report, save_report
from soulray.synth.roleplay import Cast, Dialogue, run_dialogue
from soulray.synth.roles import Counselor, Seeker, Supporter, check_prompts, load_prompts
from soulray.synth.scenarios import (
    Scenario,
    build_scenarios,
    load_pool,
    require_languages,
    scenarios_from_corpus,
)
from soulray.synth.strategies import load_taxonomy

log = logging.getLogger("soulray.synth")


def load_scenarios(sc: SynthConfig) -> list[Scenario]:
    pool = load_pool(sc.scenarios.pool_file)
    require_languages(pool, sc.scenarios.languages, sc.scenarios.pool_file)
    match sc.scenarios.source:
        case "pool":
            return build_scenarios(sc.scenarios.count, sc.seed, sc.scenarios.languages, pool)
        case "corpus":
            found = scenarios_from_corpus(
                sc.scenarios.inputs, sc.scenarios.count, sc.seed, pool, sc.scenarios.languages
            )
            if len(found) < sc.scenarios.count:
                log.warning(
                    "synth: synth.scenarios.count=%d, but the corpus has only %d usable "
                    "situations (in %s): making %d",
                    sc.scenarios.count,
                    len(found),
                    sc.scenarios.languages,
                    len(found),
                )
            return found


def check_cast(sc: SynthConfig) -> None:
    """What every actor's build_cast reads, read once on the driver first: a missing key or
    file is then one clear error, not an actor that dies in every worker."""
    prompts = load_prompts(sc.prompts_file)
    check_prompts(prompts, list(sc.scenarios.languages), "synth.prompts_file")
    load_taxonomy(sc.taxonomy_file)
    require_languages(
        load_pool(sc.scenarios.pool_file), sc.scenarios.languages, sc.scenarios.pool_file
    )
    for endpoint in sc.roles.resolved.values():
        api_key(endpoint)


def build_cast(sc: SynthConfig) -> Cast:
    """Clients for the three roles; roles on one base URL share one bound, their smallest
    concurrency."""
    prompts, taxonomy = load_prompts(sc.prompts_file), load_taxonomy(sc.taxonomy_file)
    clients = build_clients(sc.roles.resolved)
    return Cast(
        Seeker(clients["seeker"], prompts),
        Counselor(clients["counselor"], prompts, taxonomy, sc.loop.counselor_retries),
        Supporter(clients["supporter"], prompts, taxonomy),
    )


class SynthWorker:
    """A Ray Data actor: plays the scenarios it is given on its own asyncio loop."""

    def __init__(self, synth_json: str, keys: dict[str, str]):
        use_keys(keys)  # read on the driver: this worker's environment may not have them
        self.sc = SynthConfig.model_validate_json(synth_json)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cast = build_cast(self.sc)

    def __del__(self) -> None:
        """Ray Data deletes the UDF as its actor shuts down: close the roles' HTTP sessions on
        their loop (left open, aiohttp prints "Unclosed client session" for each at exit)."""
        loop, cast = getattr(self, "loop", None), getattr(self, "cast", None)
        if loop is None or cast is None or loop.is_closed():
            return
        clients = [cast.seeker.client, cast.counselor.client, cast.supporter.client]
        with contextlib.suppress(Exception):  # a loop already stopped: nothing left to close
            asyncio.run_coroutine_threadsafe(close_all(clients), loop).result(timeout=5)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        scenarios = [Scenario(**json.loads(s)) for s in batch["scenario"]]
        futures = [asyncio.run_coroutine_threadsafe(self.play(s), self.loop) for s in scenarios]
        rows = [f.result() for f in futures]
        return {key: [row[key] for row in rows] for key in rows[0]}

    async def play(self, scenario: Scenario) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            dialogue = await run_dialogue(scenario, self.cast, self.sc.loop, self.sc.quality)
        except EndpointError as e:
            return result_row(scenario, "failed", e.reason, None, time.perf_counter() - start)
        record = to_record(scenario, dialogue, self.sc) if dialogue.status == "ok" else None
        row = result_row(scenario, dialogue.status, dialogue.reason, record, 0.0)
        row["counts"] = json.dumps(dict(dialogue.counts))  # a dropped one's are reported too
        row |= {"prompt_tokens": dialogue.prompt_tokens, "turns": dialogue.turns}
        row |= {"completion_tokens": dialogue.completion_tokens}
        row["elapsed_s"] = time.perf_counter() - start
        return row


def result_row(
    scenario: Scenario, status: str, reason: str, record: dict[str, Any] | None, elapsed: float
) -> dict[str, Any]:
    return {
        "id": scenario.id,
        "status": status,
        "reason": reason,
        "record": json.dumps(record, ensure_ascii=False) if record else "",
        "counts": "{}",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "turns": 0,
        "elapsed_s": elapsed,
    }


def to_record(scenario: Scenario, dialogue: Dialogue, sc: SynthConfig) -> dict[str, Any]:
    """One output line: what prepare reads (id, topic, messages with strategy) + metadata."""
    return {
        "id": scenario.id,
        "topic": scenario.problem_type,
        "messages": dialogue.messages,
        "metadata": {
            "generator": "soulray synth",
            "scenario": scenario.to_dict(),
            "models": {role: e.model for role, e in sc.roles.resolved.items()},
            "seed": sc.seed,
            "turns": dialogue.turns,
            "stop_reason": dialogue.reason,
            "counts": dict(dialogue.counts),
            "tokens": {"prompt": dialogue.prompt_tokens, "completion": dialogue.completion_tokens},
        },
    }


def dialogue_text(record: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in record["messages"])


class Progress:
    """Counts of this run, logged every `every_s` seconds and returned in the report."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.counts = {"written": 0, "dropped": 0, "failed": 0}
        self.failures: list[str] = []  # this run's reasons (failed.jsonl keeps earlier runs' too)
        self.prompt_tokens = self.completion_tokens = 0
        self.start = self.last = time.perf_counter()
        self.lock = threading.Lock()  # the heartbeat thread logs too
        self.first_result_s: float | None = None  # start-up: actors, imports, first dialogue

    def add(self, outcome: str, row: dict[str, Any]) -> None:
        if self.first_result_s is None:
            self.first_result_s = round(time.perf_counter() - self.start, 3)
        self.counts[outcome] += 1
        if outcome == "failed":
            self.failures.append(row["reason"])
        self.prompt_tokens += int(row["prompt_tokens"])
        self.completion_tokens += int(row["completion_tokens"])
        self.log_if_due()

    def log_if_due(self) -> None:
        with self.lock:
            if time.perf_counter() - self.last < self.every_s:
                return
            self.last = time.perf_counter()
        log.info("synth: %s", self.line())

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """The progress line also while no dialogue ends: a run's first ones take minutes on a
        real model (actors starting, whole dialogues played), and the log said nothing."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.every_s / 2):
                self.log_if_due()

        thread = threading.Thread(target=beat, name="synth-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def line(self) -> str:
        done = sum(self.counts.values())
        c = self.counts
        return (
            f"{done}/{self.total} scenarios done ({c['written']} written, {c['dropped']} dropped, "
            f"{c['failed']} failed), {self.tokens_per_s():.0f} generated tokens/s"
        )

    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.perf_counter() - self.start, 1e-9)

    def summary(self) -> dict[str, Any]:
        return self.counts | {
            "scenarios": self.total,
            "elapsed_s": round(time.perf_counter() - self.start, 3),
            "first_result_s": self.first_result_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generated_tokens_per_s": round(self.tokens_per_s(), 1),
        }


def build_dataset(pending: list[Scenario], sc: SynthConfig) -> Any:
    import ray.data

    rows = [{"scenario": json.dumps(s.to_dict(), ensure_ascii=False)} for s in pending]
    # One scenario per block: each is one call to an actor, so a slow dialogue holds up nothing.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    strategy = ray.data.ActorPoolStrategy(
        size=sc.job.actors,
        max_concurrent_calls_per_actor=sc.job.dialogues_per_actor,
        enable_true_multi_threading=True,
    )
    return ds.map_batches(
        SynthWorker,
        fn_constructor_args=(sc.model_dump_json(), endpoint_keys(sc.roles.resolved.values())),
        batch_size=1,
        compute=strategy,
        num_cpus=sc.job.num_cpus_per_actor,
    )


def run_synth(cfg: Config) -> dict[str, Any]:
    """Make the dialogues not yet in the output, then write the report; returns the report."""
    sc = cfg.synth
    check_cast(sc)
    scenarios = load_scenarios(sc)
    store = OutputStore(sc.output_dir)
    state = store.load()
    pending = [s for s in scenarios if s.id not in state.finished]
    log.info(
        "synth: %d scenarios, %d already done, %d to make in %s",
        len(scenarios),
        len(scenarios) - len(pending),
        len(pending),
        sc.output_dir,
    )
    store.write_meta("config.yaml", config_to_yaml(cfg).encode())
    progress = Progress(len(pending), sc.job.progress_every_s)
    interrupted = False
    try:
        if pending:
            log.info(
                "synth: %d actor(s), up to %d dialogues each at once; progress every %g s",
                sc.job.actors,
                sc.job.dialogues_per_actor,
                sc.job.progress_every_s,
            )
            with progress.heartbeat():
                consume(build_dataset(pending, sc), store, state, sc, progress)
    except KeyboardInterrupt:  # Ctrl-C: the report still describes what is written
        interrupted = True
    finally:
        store.close()
    log.info("synth: %s", progress.line())
    report = build_report(store.load(), load_taxonomy(sc.taxonomy_file).names, progress.summary())
    report["files"] = [str(p) for p in save_report(store, report, sc.charts)]
    if interrupted:
        log.warning(
            "synth: interrupted; %s covers the %d dialogues written, "
            "and the same command makes the rest",
            report_path(sc.output_dir),
            report["dialogues"]["written"],
        )
        raise KeyboardInterrupt
    run = report["run"]
    if pending and run["failed"] == len(pending):  # not one endpoint call got through
        earlier = sum(report["dialogues"]["failed"].values()) - run["failed"]
        raise ValueError(all_failed_message(progress.failures, earlier, sc.output_dir))
    return report


def all_failed_message(failures: list[str], earlier: int, output_dir: str) -> str:
    """The error of a run that made nothing, from this run's failures: an earlier run's (an
    old base_url, say) would send the user to fix what they already fixed."""
    common = Counter(map(reason_key, failures)).most_common(1)[0][0]
    example = next(r for r in failures if reason_key(r) == common)
    also = f" (and {earlier} from earlier runs)" if earlier > 0 else ""
    return (
        f"synth: all {len(failures)} scenarios failed, most often with {example!r}; check "
        "synth.roles (base_url ends in /v1, the server is up, the model name is served); "
        f"details in {report_path(output_dir)} and failed.jsonl{also}"
    )


def consume(
    ds: Any, store: OutputStore, state: StoredState, sc: SynthConfig, progress: Progress
) -> None:
    """Write each result as it arrives; near duplicates of kept dialogues are dropped."""
    index = NearDuplicateIndex(sc.quality.near_duplicate_threshold, seed=sc.seed)
    for record in state.records:
        index.add_if_new(record["id"], dialogue_text(record))
    for row in ds.iter_rows():
        outcome = row["status"]
        if outcome == "failed":
            store.write_failed(row["id"], row["reason"])
        elif outcome == "dropped":
            store.write_dropped(row["id"], row["reason"], json.loads(row["counts"]))
        else:
            record = json.loads(row["record"])
            twin = index.add_if_new(row["id"], dialogue_text(record))
            if twin is None:
                store.write_dialogue(record)
                outcome = "written"
            else:
                store.write_dropped(row["id"], "near_duplicate", record["metadata"]["counts"])
                outcome = "dropped"
        progress.add(outcome, row)
