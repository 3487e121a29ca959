"""Synth throughput: generated tokens/s through `soulray synth` against the same endpoint driven
directly by a plain load generator at the same concurrency, side by side in one run.

    .venv/bin/python bench/synth_throughput.py [--concurrency 32] [--scenarios 256]
        [--latency 1.0] [--tokens 128] [--rounds 2] [--out bench/results/synth_throughput.json]

The endpoint is a scripted OpenAI-compatible server (tests/scripted_openai.py + the canned
roles of tests/synth_script.py) in its own process, standing in for an LLM fleet: every answer
takes --latency seconds and reports --tokens completion tokens, whatever the concurrency, as an
endpoint with spare capacity would. So the endpoint's ceiling is known (concurrency / latency
x tokens per second) and the ratio measures soulray's own cost: Ray Data start-up, the actor
pool, the role-play loop, prompts, JSON parsing, dedup and writing, at the same number of
requests in flight.

- plain: `concurrency` asyncio workers post chat completions back to back with aiohttp (one
  Seeker-shaped prompt each), as many requests as one synth run makes;
- synth: `run_synth` on local Ray, `actors` x `dialogues_per_actor` = concurrency, each dialogue
  exactly `turns` rounds (Seeker, Counselor, Supporter), timed from the call to its return
  (actor start-up and the report included).
Rounds alternate (plain, synth, plain, synth, ...) so both see the same background load; the
ratio is of the medians. Target: synth >= 0.8 x plain. Also reported: synth's start-up (call
to first finished dialogue, less that dialogue's own endpoint time: local Ray Data planning,
actor processes, imports) and the steady ratio without it, which is what a long job sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted server and roles live with the tests


def serve_forever(port: int, latency: float, tokens: int) -> None:
    """The endpoint process: scripted roles, fixed latency and token count per answer."""
    from scripted_openai import Reply, ScriptedOpenAI
    from synth_script import ScriptedRoles

    roles = ScriptedRoles(stop_after=10**6, with_persona=True)

    def answer(body: dict[str, Any]) -> Reply:
        return Reply(str(roles(body)), delay_s=latency, completion_tokens=tokens)

    ScriptedOpenAI(answer, port=port).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def start_endpoint(latency: float, tokens: int) -> tuple[subprocess.Popen, str]:
    from soulray_testing import free_port

    port = free_port()
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        str(port),
        "--latency",
        str(latency),
        "--tokens",
        str(tokens),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}/v1"


async def plain_load(url: str, concurrency: int, requests: int) -> dict[str, float]:
    """`concurrency` workers sending `requests` chat completions in all, back to back."""
    import aiohttp

    from soulray.synth.roles import load_prompts, seeker_messages
    from soulray.synth.scenarios import build_scenarios

    scenarios = build_scenarios(concurrency, 1, ["zh", "en"])
    prompts = load_prompts()
    bodies = [
        {"model": "scripted", "messages": seeker_messages(prompts, s, []), "max_tokens": 128}
        for s in scenarios
    ]
    left, tokens = [requests], [0]

    async def worker(session: aiohttp.ClientSession, body: dict[str, Any]) -> None:
        while left[0] > 0:
            left[0] -= 1
            async with session.post(f"{url}/chat/completions", json=body) as response:
                tokens[0] += (await response.json())["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, b) for b in bodies))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / seconds}


def synth_run(url: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    from soulray.config import load_config
    from soulray.synth.job import run_synth

    actors = args.actors
    cfg = load_config(
        None,
        [
            f"synth.output_dir={out}",
            f"synth.roles.seeker.base_url={url}",
            "synth.roles.seeker.model=scripted",
            f"synth.roles.seeker.concurrency={args.concurrency}",
            f"synth.scenarios.count={args.scenarios}",
            f"synth.loop.min_turns={args.turns}",
            f"synth.loop.max_turns={args.turns}",
            f"synth.job.actors={actors}",
            f"synth.job.dialogues_per_actor={args.concurrency // actors}",
            "synth.job.num_cpus_per_actor=0.5",
            "synth.charts=false",
        ],
    )
    start = time.perf_counter()
    report = run_synth(cfg)
    seconds = time.perf_counter() - start
    tokens = report["run"]["completion_tokens"]
    # Every dialogue made counts (near duplicates of scripted text are dropped after being made).
    assert report["run"]["failed"] == 0, report["dialogues"]
    # Start-up: from the call to the first finished dialogue, less that dialogue's own
    # endpoint time (its requests wait `latency` each, in sequence).
    startup = report["run"]["first_result_s"] - args.turns * 3 * args.latency
    return {
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "first_result_s": report["run"]["first_result_s"],
        "startup_s": startup,
        "steady_tokens_per_s": tokens / (seconds - startup),
    }


def main() -> None:
    from _args import positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=32,
        help="requests in flight: plain workers, synth's dialogues in all (default: %(default)s)",
    )
    p.add_argument(
        "--actors",
        type=positive_int,
        default=2,
        help="synth.job.actors; each runs concurrency // actors dialogues (default: %(default)s)",
    )
    p.add_argument(
        "--scenarios",
        type=positive_int,
        default=256,
        help="synth.scenarios.count: dialogues per synth run (default: %(default)s)",
    )
    p.add_argument(
        "--turns",
        type=positive_int,
        default=4,
        help="rounds per dialogue, 3 requests each (default: %(default)s)",
    )
    p.add_argument(
        "--latency",
        type=positive_float,
        default=1.0,
        help="seconds the scripted endpoint takes per answer (default: %(default)s)",
    )
    p.add_argument(
        "--tokens",
        type=positive_int,
        default=128,
        help="completion tokens the endpoint reports per answer (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="alternating plain/synth rounds (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "bench" / "results" / "synth_throughput.json"),
        help="the report JSON (default: bench/results/synth_throughput.json)",
    )
    args = p.parse_args()
    if args.concurrency < args.actors:  # each actor runs concurrency // actors dialogues
        p.error(f"--concurrency {args.concurrency} is below --actors {args.actors}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    if args.serve:
        serve_forever(args.serve, args.latency, args.tokens)
        return
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    proc, url = start_endpoint(args.latency, args.tokens)
    requests = args.scenarios * args.turns * 3  # Seeker, Counselor, Supporter per round
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                plain = asyncio.run(plain_load(url, args.concurrency, requests))
                synth = synth_run(url, args, Path(tmp) / f"round{r}")
                rounds.append({"plain": plain, "synth": synth})
                print(
                    f"round {r}: plain {plain['tokens_per_s']:.0f} tokens/s, "
                    f"synth {synth['tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
    finally:
        proc.kill()
        ray.shutdown()
    plain_tps = statistics.median(x["plain"]["tokens_per_s"] for x in rounds)
    synth_tps = statistics.median(x["synth"]["tokens_per_s"] for x in rounds)
    steady_tps = statistics.median(x["synth"]["steady_tokens_per_s"] for x in rounds)
    ceiling = args.concurrency / args.latency * args.tokens
    result = {
        "settings": vars(args) | {"requests_per_run": requests},
        "endpoint_ceiling_tokens_per_s": ceiling,
        "plain_tokens_per_s": round(plain_tps, 1),
        "synth_tokens_per_s": round(synth_tps, 1),
        "ratio": round(synth_tps / plain_tps, 3),
        "target": 0.8,
        "startup_s": [round(x["synth"]["startup_s"], 1) for x in rounds],
        "synth_steady_tokens_per_s": round(steady_tps, 1),
        "steady_ratio": round(steady_tps / plain_tps, 3),
        "rounds": rounds,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
