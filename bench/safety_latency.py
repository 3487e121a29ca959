"""Crisis screen latency: per message on one CPU thread, and added per chat request.

    .venv/bin/python bench/safety_latency.py [--repeats 3] [--max-chars 400 200] \
        [--embed-tokens 0 48] [--vote on off] [--out FILE]

1. Per message: `assess` on one message with the result cache cleared (lexicon + n-grams +
   e5 embedding + the linear heads), over the training messages plus long ones (25 English and
   25 Chinese, cut to their last serve.safety.max_chars characters), one thread (OMP/BLAS
   threads = 1). p50/p99 by length, for each --max-chars and --embed-tokens setting side by side
   (each message under every setting in turn). --embed-tokens overrides the shipped weights' cap
   on what the embedding reads (0: all of the last max_chars); scores then differ from the
   shipped screen's, only the time is measured. --vote off screens without the training
   messages' vote (classifier.Neighbours), to time what the vote adds.
2. Per request: the ingress app in-process (FastAPI over httpx's ASGI transport, a scripted
   engine that answers at once, the tiny export's tokenizer), a conversation growing turn by turn
   as a client resends it, with serve.safety.enabled true and false measured in alternation;
   the p50 difference is what the screen adds to a request (new message + reply; earlier
   messages come from the cache).
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from soulray.config import SafetyConfig, ServeConfig  # noqa: E402
from soulray.safety.dataset import load_examples  # noqa: E402
from soulray.safety.screen import assess, build_screen  # noqa: E402
from soulray.serve.generate import Delta  # noqa: E402

LONG = {
    "en": "I keep going back and forth about everything that happened at work and at home. " * 20,
    "zh": "这段时间我总是反反复复地想工作上和家里发生的那些事情，想不明白也放不下。" * 20,
}


def pct(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1000
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def per_message(
    repeats: int,
    stride: int,
    max_chars: list[int],
    embed_tokens: list[int | None],
    votes: tuple[str, ...] = ("on",),
) -> dict[str, dict[str, dict[str, float]]]:
    """Per-message times for each serve.safety.max_chars and embedding cap, measured side by
    side: every message is screened under each setting in turn, so machine load falls on all
    settings alike."""
    screens = {}
    for m in max_chars:
        for cap in embed_tokens:
            for vote in votes:
                screen = build_screen(SafetyConfig(max_chars=m))
                assert screen.classifier is not None
                w = screen.classifier.w
                if cap is not None:
                    w = dataclasses.replace(w, embed_tokens=cap)
                if vote == "off":
                    w = dataclasses.replace(w, neighbours=None)
                screen.classifier.w = w
                label = f"embed_tokens={w.embed_tokens}"
                if votes != ("on",):
                    label += f" vote={vote}"
                screens[f"max_chars={m} {label}"] = screen
    texts = []
    for lang in ("en", "zh"):
        own = [e.text for e in load_examples(lang)][::stride]
        texts += own + [LONG[lang] + t for t in own[:25]]  # 25 of 1,500-1,700 characters
    kinds = ("short (<40 chars)", "medium", "long (>400 chars)")
    times = {m: {k: [] for k in kinds} for m in screens}
    for _ in range(repeats):
        for t in texts:
            key = kinds[0] if len(t) < 40 else kinds[2] if len(t) > 400 else kinds[1]
            for m, screen in screens.items():
                screen.cache.clear()
                start = time.perf_counter()
                assess(screen, [t])
                times[m][key].append(time.perf_counter() - start)
    out = {}
    for m, by_kind in times.items():
        out[m] = {k: pct(v) for k, v in by_kind.items()}
        out[m]["all"] = pct([x for v in by_kind.values() for x in v])
    return out


class InstantEngine:
    async def complete(self, req):
        return [Delta("That sounds hard. What happened next?", 8, "stop")]

    async def stream(self, req):
        for delta in await self.complete(req):
            yield delta


def per_request(turns: int, rounds: int) -> dict[str, dict[str, float]]:
    from soulray.serve.app import build_api, build_state
    from soulray.serve.tiny import build_tiny_export

    export = build_tiny_export(Path(tempfile.mkdtemp()) / "export")
    apis = {
        on: build_api(
            build_state(ServeConfig(safety={"enabled": on}), str(export), InstantEngine())
        )
        for on in (True, False)
    }
    users = [e.text for e in load_examples("en")[::97]][:turns]
    times: dict[bool, list[float]] = {True: [], False: []}

    async def go() -> None:
        clients = {
            on: httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t")
            for on, api in apis.items()
        }
        for r in range(rounds):
            for on in (True, False):
                messages: list[dict[str, str]] = []
                for i, text in enumerate(users):
                    messages.append({"role": "user", "content": f"{text} ({r}.{i})"})
                    start = time.perf_counter()
                    resp = await clients[on].post(
                        "/v1/chat/completions", json={"messages": messages}
                    )
                    times[on].append(time.perf_counter() - start)
                    messages.append(resp.json()["choices"][0]["message"])
        for c in clients.values():
            await c.aclose()

    asyncio.run(go())
    on, off = pct(times[True]), pct(times[False])
    return {
        "safety_on": on,
        "safety_off": off,
        "added_p50_ms": {"value": on["p50_ms"] - off["p50_ms"]},
    }


def main() -> None:
    from _args import non_negative_int, positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="passes over the messages, per-message part (default: %(default)s)",
    )
    ap.add_argument(
        "--stride",
        type=positive_int,
        default=1,
        help="screen every n-th training message (default: %(default)s: all)",
    )
    ap.add_argument(
        "--turns",
        type=positive_int,
        default=8,
        help="user messages per conversation, per-request part (default: %(default)s)",
    )
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        help="conversations per setting, screen on and off in turn (default: %(default)s)",
    )
    ap.add_argument(
        "--max-chars",
        type=positive_int,
        nargs="+",
        default=[SafetyConfig().max_chars],
        help="serve.safety.max_chars settings to measure side by side",
    )
    ap.add_argument(
        "--embed-tokens",
        type=non_negative_int,
        nargs="+",
        default=[None],
        help="caps on the tokens the embedding reads, side by side (default: the weights')",
    )
    ap.add_argument(
        "--vote",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="with and/or without the training messages' vote, side by side",
    )
    ap.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = ap.parse_args()
    for m in args.max_chars:  # serve.safety.max_chars has a floor
        try:
            SafetyConfig(max_chars=m)
        except ValueError as e:  # pydantic's ValidationError
            ap.error(f"--max-chars {m}: {e.errors()[0]['msg']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    result = {
        "load_average": list(os.getloadavg()),
        "per_message": per_message(
            args.repeats, args.stride, args.max_chars, args.embed_tokens, tuple(args.vote)
        ),
        "per_request": per_request(args.turns, args.rounds),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), "utf-8")


if __name__ == "__main__":
    main()
