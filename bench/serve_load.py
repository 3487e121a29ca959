"""Serve load benchmark: asyncio + httpx clients against the soulray endpoint on local Ray Serve.

    .venv/bin/python bench/serve_load.py [--model-dir DIR] [--max-tokens 32] [--out results.json]

In one run, on loopback only, bounded in requests and seconds per level:
1. the `hf` engine with batching and the same engine one request at a time
   (serve.engine.batching.enabled=false), deployed side by side and measured in alternation
   (A, B, A, B, ... so both see the same background load) over 1/4/16/64 concurrent streaming
   clients: requests/s, output tokens/s, p50/p99 latency and time to first token, errors;
2. the same two engine configurations called directly in this process (the replica's
   Scheduler, no Serve, no HTTP): what batching itself buys, apart from the serving stack;
3. Ray Serve's own cost with the `noop` engine: the full Serve path (proxy -> ingress replica ->
   engine replica) against the very same FastAPI ingress and noop engine served in-process by
   uvicorn (no Ray), one client, p50 difference = the overhead Serve adds.
The hf sweep runs both serve.layouts side by side (`--layout both`, the default: four apps,
taking turns; or name one), and reports the batched / one-at-a-time ratio of each; the overhead
measure always compares both layouts, with the crisis screen off and on (`--screen off` turns it
off in the sweep too). `--levels 16` limits the sweep, `--skip-sweep` / `--skip-overhead` skip a
part, `--stream-interval S` sets serve.engine.stream_interval_s, `--serve-env KEY=VALUE` sets an
environment variable (a RAY_SERVE_* knob) for every Ray process of the run. `--soak-minutes N`
runs only the soak (bench/serve_soak.py, default layout unless one is named): 16 staggered
clients, step time, tokens/s and replica memory per window, first minute against the last.
Without --model-dir a tiny random export is built (it always writes max_tokens tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

LEVELS = (1, 4, 16, 64)
HOST = "127.0.0.1"


@dataclass
class LevelResult:
    engine: str
    clients: int
    requests: int
    errors: int
    errors_5xx: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    layout: str = ""  # of the Serve path; "" = no Serve (direct)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(http: httpx.AsyncClient, i: int, max_tokens: int, stream: bool) -> dict:
    """One chat completion; returns status, latency, time to first token, output tokens."""
    body = {
        "messages": [{"role": "user", "content": f"I had a hard week at work, number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    if not stream:
        resp = await http.post("/v1/chat/completions", json=body)
        done = time.perf_counter() - start
        ok = resp.status_code == 200
        tokens = resp.json()["usage"]["completion_tokens"] if ok else 0
        return {"status": resp.status_code, "latency": done, "ttft": done, "tokens": tokens}
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if first is None and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        status = resp.status_code
    done = time.perf_counter() - start
    return {"status": status, "latency": done, "ttft": first or done, "tokens": tokens}


async def run_level(
    url: str,
    clients: int,
    max_requests: int,
    max_seconds: float,
    max_tokens: int,
    stream: bool = True,
    first: int = 0,
) -> tuple[list[dict], float]:
    """`clients` concurrent loops until max_requests are sent or max_seconds have passed
    (request i, from `first` on, says "number i": a new message for the crisis screen)."""
    results: list[dict] = []
    counter = iter(range(first, first + max_requests))
    deadline = time.perf_counter() + max_seconds

    async def client_loop(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            try:
                results.append(await one_request(http, i, max_tokens, stream))
            except httpx.HTTPError:
                results.append({"status": 599, "latency": 0.0, "ttft": 0.0, "tokens": 0})

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        return results, time.perf_counter() - start


def summarize(
    engine: str, clients: int, results: list[dict], seconds: float, layout: str = ""
) -> LevelResult:
    good = [r for r in results if r["status"] == 200]
    lat = [r["latency"] * 1000 for r in good]
    ttft = [r["ttft"] * 1000 for r in good]
    return LevelResult(
        engine,
        clients,
        len(results),
        len(results) - len(good),
        sum(r["status"] >= 500 for r in results),
        round(seconds, 2),
        round(len(good) / seconds, 2),
        round(sum(r["tokens"] for r in good) / seconds, 1),
        round(pct(lat, 0.5), 1),
        round(pct(lat, 0.99), 1),
        round(pct(ttft, 0.5), 1),
        round(pct(ttft, 0.99), 1),
        layout,
    )


def serve_config(
    model_dir: str,
    port: int,
    kind: str,
    batching: bool,
    name: str,
    layout: str = "two_deployments",
    screen: bool = True,
    num_cpus: float = 0.8,
    stream_interval_s: float | None = None,
) -> Any:
    from soulray.config import Config

    return Config.model_validate(
        {
            "serve": {
                "port": port,
                "host": HOST,
                "app_name": name,
                "layout": layout,
                "max_tokens_limit": 512,
                "safety": {"enabled": screen},
                "engine": {
                    "kind": kind,
                    "model_dir": model_dir,
                    "max_ongoing_requests": 64,
                    "num_cpus": num_cpus,
                    "batching": {"enabled": batching, "max_batch_size": 16},
                    **(
                        {}
                        if stream_interval_s is None
                        else {"stream_interval_s": stream_interval_s}
                    ),
                },
                "ingress": {"num_cpus": 0.1},
            }
        }
    )


def deploy(cfg: Any, prefix: str) -> str:
    from ray import serve

    from soulray.serve.app import build_application

    serve.run(build_application(cfg), name=cfg.serve.app_name, route_prefix=prefix)
    return f"http://{HOST}:{cfg.serve.port}{prefix.rstrip('/')}"


ENGINES = (("hf batched", True, "/batched"), ("hf one-at-a-time", False, "/single"))


LAYOUTS = ("two_deployments", "one_deployment")


def layouts_of(arg: str) -> tuple[str, ...]:
    return LAYOUTS if arg == "both" else (arg,)


def sweep_served(model_dir: str, port: int, args: argparse.Namespace) -> list[LevelResult]:
    """Both engine configurations in every layout asked for, all deployed at once and measured
    in alternation per level (so each sees the same background load)."""
    from ray import serve

    layouts = layouts_of(args.layout)
    cpus = 0.8 if len(layouts) == 1 else 0.4  # 2 CPUs hold all four (torch: 1 thread either way)
    urls: dict[tuple[str, str], str] = {}
    for layout in layouts:
        for name, batching, prefix in ENGINES:
            app = f"{prefix.strip('/')}-{layout}"
            cfg = serve_config(
                model_dir,
                port,
                "hf",
                batching,
                app,
                layout,
                args.screen == "on",
                cpus,
                args.stream_interval,
            )
            urls[name, layout] = deploy(cfg, f"/{app}")
            asyncio.run(run_level(urls[name, layout], 4, 8, 30, args.max_tokens))  # warm-up
    rows = []
    for clients in args.levels:
        runs: dict[tuple[str, str], tuple[list[dict], float]] = {key: ([], 0.0) for key in urls}
        for _ in range(args.rounds):
            for key, url in urls.items():
                n = args.requests_per_client * clients // args.rounds
                res, secs = asyncio.run(
                    run_level(url, clients, max(n, clients), args.max_seconds, args.max_tokens)
                )
                runs[key] = (runs[key][0] + res, runs[key][1] + secs)
        for (name, layout), (res, secs) in runs.items():
            rows.append(summarize(name, clients, res, secs, layout))
            print(json.dumps(asdict(rows[-1])), flush=True)
    for url in urls.values():
        serve.delete(url.rsplit("/", 1)[1])
    return rows


def sweep_direct(model_dir: str, args: argparse.Namespace) -> list[LevelResult]:
    """The replica's Scheduler called in this process (one torch thread, like a 1-CPU replica):
    batching against one-at-a-time with no serving stack around it."""
    import torch

    from soulray.serve.generate import GenRequest, eos_ids, load_model
    from soulray.serve.prompt import render_ids
    from soulray.serve.scheduler import Scheduler

    torch.set_num_threads(1)
    model, tok, device = load_model(model_dir, None, "auto")
    rows = []
    for name, batching, _ in ENGINES:
        for clients in args.levels:

            async def level(clients: int = clients, rows_max: int = 16 if batching else 1):
                sched = Scheduler(model, tok, eos_ids(model, tok), device, rows_max)
                results, counter = [], iter(range(args.requests_per_client * clients))

                async def client_loop() -> None:
                    for i in counter:
                        msg = [{"role": "user", "content": f"I had a hard week, number {i}."}]
                        req = GenRequest(
                            str(i), render_ids(tok, msg, ""), args.max_tokens, 0.7, 0.9, i
                        )
                        start, first, tokens = time.perf_counter(), None, 0
                        async for delta in sched.deltas(sched.submit(req)):
                            first = first or time.perf_counter() - start
                            tokens = delta.tokens
                        done = time.perf_counter() - start
                        results.append(
                            {
                                "status": 200,
                                "latency": done,
                                "ttft": first or done,
                                "tokens": tokens,
                            }
                        )

                start = time.perf_counter()
                await asyncio.gather(*(client_loop() for _ in range(clients)))
                seconds = time.perf_counter() - start
                sched.task.cancel()
                return results, seconds

            res, secs = asyncio.run(level())
            rows.append(summarize(f"{name} (direct)", clients, res, secs))
            print(json.dumps(asdict(rows[-1])), flush=True)
    return rows


class LocalEngine:
    """The noop engine called in-process (the ingress's EngineClient interface, no Ray)."""

    def __init__(self) -> None:
        from soulray.serve.engine import NoopEngine

        self.engine = NoopEngine({}, "")

    async def complete(self, req: Any) -> Any:
        return await self.engine.generate(req)

    async def stream(self, req: Any):
        async for delta in self.engine.stream(req):
            yield delta


def start_uvicorn(model_dir: str, port: int, screen: bool) -> None:
    """The same FastAPI ingress with the noop engine in this process, served by uvicorn."""
    import uvicorn

    from soulray.serve.app import build_api, build_state

    cfg = serve_config(model_dir, port, "noop", True, "direct", screen=screen).serve
    api = build_api(build_state(cfg, model_dir, LocalEngine()))
    server = uvicorn.Server(uvicorn.Config(api, host=HOST, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)


def measure_overhead(model_dir: str, serve_port: int, n: int, chunks: int = 10) -> dict:
    """The noop engine through Serve in both layouts against the same ingress on uvicorn, with
    the crisis screen off (Serve's cost and ours) and on (every request a new message, so each
    pays one classifier call, as a first message does). One client; the endpoints take turns in
    `chunks` slices of n requests so that they share the background load."""
    from ray import serve

    urls: dict[tuple[str, str], str] = {}
    for screen in ("off", "on"):
        urls["direct", screen] = f"http://{HOST}:{free_port()}"
        start_uvicorn(model_dir, int(urls["direct", screen].rsplit(":", 1)[1]), screen == "on")
        for layout in LAYOUTS:
            app = f"noop-{layout}-screen-{screen}".replace("_", "-")
            cfg = serve_config(
                model_dir, serve_port, "noop", True, app, layout, screen == "on", num_cpus=0.1
            )
            urls[layout, screen] = deploy(cfg, f"/{app}")
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in urls}
    for url in urls.values():
        asyncio.run(run_level(url, 1, 20, 30, 8, stream=False, first=10**6))  # warm-up
    per = max(1, n // chunks)
    for c in range(chunks):
        for key, url in urls.items():
            res, _ = asyncio.run(run_level(url, 1, per, 60, 8, stream=False, first=c * per))
            runs[key] += res
    for key, url in urls.items():
        if key[0] != "direct":
            serve.delete(url.rsplit("/", 1)[1])
    result: dict[str, Any] = {"requests_each": per * chunks}
    for screen in ("off", "on"):
        direct = summarize("direct", 1, runs["direct", screen], 1.0)
        entry = {"direct_p50_ms": direct.p50_ms, "direct_p99_ms": direct.p99_ms}
        for layout in LAYOUTS:
            row = summarize(layout, 1, runs[layout, screen], 1.0)
            entry[f"{layout}_p50_ms"] = row.p50_ms
            entry[f"{layout}_p99_ms"] = row.p99_ms
            entry[f"{layout}_overhead_p50_ms"] = round(row.p50_ms - direct.p50_ms, 2)
            entry[f"{layout}_errors"] = row.errors
        result[f"screen_{screen}"] = entry
        print(json.dumps({f"screen_{screen}": entry}), flush=True)
    return result


def measure_floor(port: int, n: int) -> dict:
    """Bare Ray Serve on this machine, for scale: an empty FastAPI ingress (proxy + 1 replica)
    and the same ingress awaiting an empty second deployment (proxy + 2 replicas, our shape)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Leaf:
        async def __call__(self, x: int) -> int:
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Root:
        def __init__(self, leaf: Any) -> None:
            self.leaf = leaf

        @api.post("/one")
        async def one(self) -> dict:
            return {"ok": 1}

        @api.post("/two")
        async def two(self) -> dict:
            return {"ok": await self.leaf.remote(1)}

    serve.run(Root.bind(Leaf.bind()), name="floor", route_prefix="/floor")

    async def p50(path: str) -> float:
        lat = []
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}/floor") as http:
            for i in range(n + 20):
                start = time.perf_counter()
                (await http.post(path)).raise_for_status()
                if i >= 20:  # the first 20 warm up
                    lat.append((time.perf_counter() - start) * 1000)
        return round(pct(lat, 0.5), 1)

    out = {
        "one_replica_p50_ms": asyncio.run(p50("/one")),
        "two_replicas_p50_ms": asyncio.run(p50("/two")),
    }
    serve.delete("floor")
    print(json.dumps(out), flush=True)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def markdown(rows: list[LevelResult], overhead: dict, load: str = "") -> str:
    lines = [
        "| layout | engine | clients | requests | errors (5xx) | req/s | output tok/s | p50 ms "
        "| p99 ms | TTFT p50 ms | TTFT p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layout or 'direct'} | {r.engine} | {r.clients} | {r.requests} "
            f"| {r.errors} ({r.errors_5xx}) | {r.requests_per_s} | {r.tokens_per_s} | {r.p50_ms} "
            f"| {r.p99_ms} | {r.ttft_p50_ms} | {r.ttft_p99_ms} |"
        )
    by = {(r.layout, r.engine, r.clients): r.tokens_per_s for r in rows}

    def ratio(layout: str, suffix: str = "") -> str:
        one = by.get((layout, "hf one-at-a-time" + suffix, 16))
        return f"{by[(layout, 'hf batched' + suffix, 16)] / one:.1f}x" if one else "n/a"

    served = sorted({r.layout for r in rows if r.layout})
    through = ", ".join(f"{layout} {ratio(layout)}" for layout in served)
    lines += [
        "",
        f"batched / one-at-a-time output tokens/s at 16 clients: through Serve {through}; "
        f"engine called directly {ratio('', ' (direct)')} (target >= 4x)",
    ]
    for screen in ("off", "on"):
        entry = overhead.get(f"screen_{screen}")
        if entry is None:
            continue
        lines.append(
            f"Serve overhead over the noop engine, crisis screen {screen}, 1 client, "
            f"{overhead['requests_each']} requests each (taking turns): same ingress on uvicorn "
            f"without Ray p50 {entry['direct_p50_ms']} ms; two deployments p50 "
            f"{entry['two_deployments_p50_ms']} ms (+{entry['two_deployments_overhead_p50_ms']}), "
            f"one deployment p50 {entry['one_deployment_p50_ms']} ms "
            f"(+{entry['one_deployment_overhead_p50_ms']}) (target <= +5 ms)"
        )
    if "floor" in overhead:
        lines.append(
            f"bare Ray Serve on this machine (empty handlers): proxy + 1 replica p50 "
            f"{overhead['floor']['one_replica_p50_ms']} ms, proxy + 2 replicas p50 "
            f"{overhead['floor']['two_replicas_p50_ms']} ms"
        )
    if load:
        lines.append(f"load average (1, 5, 15 min) at the end: {load}")
    return "\n".join(lines)


def main() -> None:
    from _args import existing_dir, non_negative_float, positive_float, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=existing_dir, help="an export; default: build a tiny random one"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=32,
        help="max_tokens of each request (default: %(default)s)",
    )
    parser.add_argument(
        "--requests-per-client",
        type=positive_int,
        default=8,
        help="requests per client per level, over all rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--max-seconds",
        type=positive_float,
        default=60.0,
        help="seconds each endpoint runs per level and round, at most (default: %(default)s)",
    )
    parser.add_argument(
        "--overhead-requests",
        type=positive_int,
        default=300,
        help="requests per endpoint in the overhead and bare-Serve measures (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="alternations per level (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--levels",
        type=positive_int,
        nargs="+",
        default=list(LEVELS),
        metavar="CLIENTS",
        help="concurrent clients of each sweep level (default: %(default)s)",
    )
    parser.add_argument(
        "--layout",
        choices=("both", *LAYOUTS),
        default="both",
        help="serve.layout of the hf sweep (both: side by side); the soak takes the default "
        "layout unless one is named",
    )
    parser.add_argument(
        "--screen", choices=("on", "off"), default="on", help="the crisis screen in the hf sweep"
    )
    parser.add_argument(
        "--stream-interval",
        type=non_negative_float,
        help="serve.engine.stream_interval_s of the hf sweep",
    )
    parser.add_argument(
        "--skip-overhead", action="store_true", help="the sweeps only (no overhead measures)"
    )
    parser.add_argument("--skip-sweep", action="store_true", help="the overhead measures only")
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for every Ray process (e.g. a RAY_SERVE_* knob)",
    )
    parser.add_argument(
        "--soak-minutes",
        type=non_negative_float,
        default=0,
        help="minutes of soak; >0: the soak only (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    for pair in args.serve_env:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--serve-env takes KEY=VALUE, got {pair!r}")
        os.environ[key] = value  # before ray.init: the local cluster's processes inherit it

    import ray
    from ray import serve

    from soulray.serve.tiny import build_tiny_export

    model_dir = args.model_dir or str(build_tiny_export(tempfile.mkdtemp(prefix="soulray-bench-")))
    ray.init(
        address="local",  # its own Ray, never a cluster someone else runs on this machine
        num_cpus=2,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port}, logging_config={"log_level": "WARNING"})
    if args.soak_minutes:
        from serve_soak import run_soak

        from soulray.config import ServeConfig

        if args.layout == "both":
            args.layout = ServeConfig().resolved_layout()
        report = run_soak(model_dir, port, args, serve_config, deploy)
        serve.shutdown()
        ray.shutdown()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return
    rows = [] if args.skip_sweep else sweep_served(model_dir, port, args)
    overhead: dict[str, Any] = {"requests_each": 0}
    if not args.skip_overhead:
        overhead = measure_overhead(model_dir, port, args.overhead_requests)
        overhead["floor"] = measure_floor(port, args.overhead_requests)
    serve.shutdown()
    ray.shutdown()
    if not args.skip_sweep:
        rows += sweep_direct(model_dir, args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = markdown(rows, overhead, load)
    print(table)
    if args.out:
        payload = {
            "rows": [asdict(r) for r in rows],
            "overhead": overhead,
            "serve_env": args.serve_env,
            "load_average": os.getloadavg(),
            "table": table,
        }
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
