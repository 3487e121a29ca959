"""Eval throughput: requests/s through `soulray eval` against the same endpoint driven directly by
a plain load generator at the same concurrency, side by side in one run.

    .venv/bin/python bench/eval_throughput.py [--concurrency 32] [--contexts 512]
        [--latency 0.25] [--rounds 2] [--out bench/results/eval_throughput.json]

The endpoint is a scripted OpenAI-compatible server (tests/scripted_openai.py) in its own
process, standing in for a model fleet and a judge with spare capacity: every answer takes
--latency seconds, whatever the concurrency, so its ceiling is concurrency / latency requests/s
and the ratio measures soulray's own cost. One eval run makes `contexts` replies (one model) and
`contexts` judge calls (the soulchat rubric, answered with valid JSON), pairwise and interactive
off.

- plain: `concurrency` asyncio workers post the same number of chat completions with aiohttp,
  replies first, then judge calls (eval's phases are sequential too);
- eval: `run_eval` on local Ray (started before timing), timed from the call to its return:
  reading the corpus with Ray Data, sampling, the Ray tasks, metrics, bootstrap CIs, report.json,
  report.md and the charts included; its generation and judge phases are also timed alone
  (report.json's meta.phases: from a phase's Ray task submission to its result).
Rounds alternate (plain, eval, plain, eval, ...) so both see the same background load; ratios
are of the medians. Target (DESIGN.md): eval >= 0.8 x plain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted server lives with the tests

SCORES = {d: {"score": 1, "reason": "ok"} for d in ("Content", "Empathy", "Helpfulness", "Safety")}
REPLY = "That sounds really hard. I'm here with you; what happened after that?"


def serve_forever(port: int, latency: float) -> None:
    """The endpoint process: a judge answer for judge prompts, a reply otherwise."""
    from scripted_openai import Reply, ScriptedOpenAI

    def answer(body: dict[str, Any]) -> Reply:
        judging = "evaluator" in body["messages"][0]["content"]
        return Reply(json.dumps(SCORES) if judging else REPLY, delay_s=latency)

    ScriptedOpenAI(answer, port=port).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def start_endpoint(latency: float) -> tuple[subprocess.Popen, str]:
    from soulray_testing import free_port

    port = free_port()
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import eval_throughput as b; b.serve_forever({port}, {latency})"  # noqa: E501
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}/v1"


def write_corpus(path: Path, contexts: int) -> None:
    """Dialogues of 4 exchanges (4 contexts each), distinct texts."""
    with path.open("w") as f:
        for i in range((contexts + 3) // 4):
            messages = []
            for t in range(4):
                messages.append({"role": "user", "content": f"dialogue {i} turn {t}: I feel low."})
                messages.append({"role": "assistant", "content": f"I hear you ({i}, {t})."})
            f.write(json.dumps({"id": f"d{i}", "messages": messages}) + "\n")


async def plain_run(url: str, requests: int, concurrency: int) -> float:
    """Seconds for `requests` replies then `requests` judge calls, `concurrency` in flight."""
    import aiohttp

    async def phase(session: aiohttp.ClientSession, system: str) -> None:
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                messages = [{"role": "system", "content": system}]
                messages.append({"role": "user", "content": "I feel low."})
                body = {"model": "scripted", "messages": messages, "max_tokens": 256}
                async with session.post(f"{url}/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.json()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await phase(session, "You are a supporter.")
        await phase(session, "You are an evaluator.")
        return time.perf_counter() - start


def eval_run(url: str, corpus: Path, out: Path, contexts: int, concurrency: int) -> dict:
    from soulray.config import Config
    from soulray.eval.run import run_eval

    endpoint = {"base_url": url, "model": "scripted", "concurrency": concurrency}
    cfg = Config.model_validate(
        {
            "eval": {
                "models": [{"name": "m", "endpoint": endpoint}],
                "contexts": {"source": "files", "inputs": [str(corpus)], "n": contexts},
                "judge": {"endpoint": endpoint, "pairwise": False},
                "output_dir": str(out),
            }
        }
    )
    start = time.perf_counter()
    report = run_eval(cfg)
    total = time.perf_counter() - start
    judged = report["summary"]["turn"]["m"]["judge"]
    assert len(report["contexts"]) == contexts and judged["scored"] == contexts, judged
    return {"total_s": round(total, 3)} | report["meta"]["phases"]


def main() -> None:
    from _args import positive_float, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=32,
        help="requests in flight, plain workers and the eval endpoints' concurrency (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--contexts",
        type=positive_int,
        default=512,
        help="contexts per eval run: as many replies and judge calls (default: %(default)s)",
    )
    parser.add_argument(
        "--latency",
        type=positive_float,
        default=0.25,
        help="seconds the scripted endpoint takes per answer (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="alternating plain/eval rounds (default: %(default)s)",
    )
    parser.add_argument("--out", help="also write the summary here as JSON")
    args = parser.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    proc, url = start_endpoint(args.latency)
    requests = 2 * args.contexts
    ceiling = args.concurrency / args.latency
    rows: dict[str, list[Any]] = {"plain": [], "eval": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, args.contexts)
            for r in range(args.rounds):
                rows["plain"].append(asyncio.run(plain_run(url, args.contexts, args.concurrency)))
                out = Path(tmp) / f"eval{r}"
                rows["eval"].append(eval_run(url, corpus, out, args.contexts, args.concurrency))
                print(f"round {r}: plain {rows['plain'][-1]:.2f} s, eval {rows['eval'][-1]}")
    finally:
        proc.kill()
        ray.shutdown()
    plain = statistics.median(rows["plain"])
    total = statistics.median(e["total_s"] for e in rows["eval"])
    gen = statistics.median(e["generate_s"] for e in rows["eval"])
    judge = statistics.median(e["judge_s"] for e in rows["eval"])
    summary = {
        "args": vars(args),
        "requests": requests,
        "endpoint_ceiling_req_s": ceiling,
        "plain_req_s": requests / plain,
        "eval_req_s_end_to_end": requests / total,
        "ratio_end_to_end": plain / total,
        "eval_req_s_generate_and_judge": requests / (gen + judge),
        "ratio_generate_and_judge": plain / (gen + judge),
        "rounds": rows,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
