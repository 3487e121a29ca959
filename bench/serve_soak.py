"""Soak mode of bench/serve_load.py (--soak-minutes N): 16 streaming clients with staggered
arrivals against the batched `hf` engine for N minutes. Every window the engine replica's
counters (tokens, steps, seconds in forward passes, KV width) and its resident memory are read;
the report compares the first minute (after the ramp) with the last one: steady state means step
time, tokens/s and memory at the end within 10 % of the first minute's, and zero 5xx.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

CLIENTS = 16
STAGGER_S = 0.5  # client k starts k * STAGGER_S after the first


def replica(app: str, deployment: str) -> tuple[Any, int]:
    """The deployment's handle and its (single) replica's pid."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    (running,) = [
        r
        for r in details.applications[app].deployments[deployment].replicas
        if r.state == "RUNNING"
    ]
    return serve.get_deployment_handle(deployment, app_name=app), running.pid


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client(http: httpx.AsyncClient, k: int, end: float, max_tokens: int, log: list) -> None:
    rng = random.Random(k)
    await asyncio.sleep(k * STAGGER_S)
    i = 0
    while time.monotonic() < end:
        body = {
            "messages": [{"role": "user", "content": f"a long week, client {k} turn {i}"}],
            "max_tokens": rng.randint(max_tokens // 2, max_tokens * 2),
            "temperature": 0.7,
            "seed": k * 100_000 + i,
            "stream": True,
        }
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for _ in resp.aiter_lines():
                    pass
                log.append((time.monotonic(), resp.status_code))
        except httpx.HTTPError:
            log.append((time.monotonic(), 599))
        i += 1
        await asyncio.sleep(rng.uniform(0, 0.5))  # think time keeps arrivals staggered


async def sample(handle: Any, pid: int, start: float, end: float, window: float) -> list[dict]:
    """One record per window: what the engine did in it and the replica's memory at its end."""
    rows, before = [], await handle.counters.remote()
    while time.monotonic() + window <= end + 1:
        await asyncio.sleep(window)
        now = await handle.counters.remote()
        tokens = sum(int(k) * n for k, n in now["step_sizes"].items()) - sum(
            int(k) * n for k, n in before["step_sizes"].items()
        )
        steps = sum(now["step_sizes"].values()) - sum(before["step_sizes"].values())
        seconds = now["step_seconds"] - before["step_seconds"]
        rows.append(
            {
                "t_s": round(time.monotonic() - start, 1),
                "tokens_per_s": round(tokens / window, 1),
                "step_ms": round(1000 * seconds / max(steps, 1), 2),
                "rows_per_step": round(tokens / max(steps, 1), 2),
                "rss_mib": round(rss_mib(pid), 1),
                "kv_width": now["kv_width"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        before = now
    return rows


def minute(rows: list[dict], first: bool) -> dict:
    chosen = [r for r in rows if r["t_s"] <= rows[0]["t_s"] + 60] if first else []
    if not first:
        chosen = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] - 60]
    keys = ("tokens_per_s", "step_ms", "rows_per_step", "rss_mib")
    return {k: round(sum(r[k] for r in chosen) / len(chosen), 2) for k in keys}


def run_soak(model_dir: str, port: int, args: Any, serve_config: Any, deploy: Any) -> dict:
    from ray import serve

    cfg = serve_config(model_dir, port, "hf", True, "soak", args.layout)
    cfg.serve.max_tokens_limit = 4 * args.max_tokens
    url = deploy(cfg, "/soak")
    handle, pid = replica("soak", "Engine" if args.layout == "two_deployments" else "Ingress")
    window = 20.0 if args.soak_minutes < 5 else 30.0

    async def go() -> tuple[list[dict], list]:
        log: list = []
        ramp = CLIENTS * STAGGER_S
        start = time.monotonic()
        end = start + ramp + 60 * args.soak_minutes
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
            clients = [client(http, k, end, args.max_tokens, log) for k in range(CLIENTS)]
            await asyncio.sleep(ramp)
            samples = asyncio.ensure_future(sample(handle, pid, start, end, window))
            await asyncio.gather(*clients)
            return await samples, log

    rows, log = asyncio.run(go())
    serve.delete("soak")
    first, last = minute(rows, True), minute(rows, False)
    report = {
        "minutes": args.soak_minutes,
        "layout": args.layout,
        "requests": len(log),
        "errors_5xx": sum(status >= 500 for _, status in log),
        "first_minute": first,
        "last_minute": last,
        "last_over_first": {k: round(last[k] / first[k], 3) for k in first},
        "windows": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=2), flush=True)
    return report
