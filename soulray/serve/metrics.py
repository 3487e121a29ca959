"""soulray's own serving metrics, exported through Ray's Prometheus endpoint beside Ray Serve's.

Built with `ray.serve.metrics`, so every series also carries Serve's `application`,
`deployment`, `replica` (and, for requests, `route`) tags. Ray prefixes each name with `ray_`:

- `ray_soulray_requests_total{status}`: chat-completion responses by status code (not probes
  or /v1/models); a stream that failed after its 200 was sent counts as the error it reported
  in the stream (500, or the engine's 504), so a 5xx alert sees it.
- `ray_soulray_time_to_first_token_seconds`: request submitted to the engine -> first token.
- `ray_soulray_generated_tokens_total`: tokens sampled; tokens/s is its rate().
- `ray_soulray_engine_step_seconds`: one forward pass of the running batch.
- `ray_soulray_engine_batch_size`: rows in each forward pass.
- `ray_soulray_engine_queue_depth`: requests waiting for a row in the batch.
- `ray_soulray_engine_running_requests`: rows in the batch now.

Never message text: the only labels are a status code and Serve's own.
Objects are created inside a replica (Ray metrics belong to the process that records them).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI
from ray.serve.exceptions import RequestCancelledError, TaskCancelledError
from starlette.requests import ClientDisconnect

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]


class IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "soulray_requests",
            description="Chat API responses by HTTP status code.",
            tag_keys=("status",),
        )


class EngineMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.ttft = metrics.Histogram(
            "soulray_time_to_first_token_seconds",
            description="Seconds from a request reaching the engine to its first token.",
            boundaries=TTFT_BUCKETS,
        )
        self.tokens = metrics.Counter(
            "soulray_generated_tokens", description="Tokens generated (rate = tokens/s)."
        )
        self.step = metrics.Histogram(
            "soulray_engine_step_seconds",
            description="Seconds per forward pass of the running batch.",
            boundaries=STEP_BUCKETS,
        )
        self.batch = metrics.Histogram(
            "soulray_engine_batch_size",
            description="Rows (requests) in each forward pass.",
            boundaries=BATCH_BUCKETS,
        )
        self.queue = metrics.Gauge(
            "soulray_engine_queue_depth", description="Requests waiting for a row in the batch."
        )
        self.running = metrics.Gauge(
            "soulray_engine_running_requests", description="Rows in the running batch."
        )

    def record_step(self, rows: int, seconds: float, waiting: int, running: int) -> None:
        """After every forward pass: each row sampled one token."""
        self.tokens.inc(rows, tags={})
        self.step.observe(seconds, tags={})
        self.batch.observe(rows, tags={})
        self.record_queue(waiting, running)

    def record_queue(self, waiting: int, running: int) -> None:
        self.queue.set(waiting, tags={})
        self.running.set(running, tags={})

    def record_first_token(self, submitted: float) -> None:
        self.ttft.observe(time.monotonic() - submitted, tags={})


def add_request_metrics(api: FastAPI, metrics: IngressMetrics) -> None:
    """Count every response of the chat API by status: an ASGI wrapper that reads the status as it
    is sent (streams stay untouched). A crash that escapes the handlers counts as 500, a client
    gone (before any response, or Serve cancelled its request) as 499 (nginx's "client closed
    request"), and a stream that failed after its 200 as the error it reported in the stream
    (STREAM_ERROR)."""
    api.add_middleware(RequestCounter, metrics=metrics)


CHAT_PATH = "/v1/chat/completions"
# A client that hung up (Serve cancels its request): answered with a 499 (app.py's handler), and
# counted so: the handler that answers runs outside this counter, which sees the exception only.
CLIENT_GONE = (RequestCancelledError, TaskCancelledError, ClientDisconnect)
# The scope key where a stream that failed after its 200 was sent puts its error's status
# (app.ClosingStreamingResponse): the status line cannot change then, the count can.
STREAM_ERROR = "soulray.stream_error"


class RequestCounter:
    def __init__(self, app: Any, metrics: IngressMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith(CHAT_PATH):
            await self.app(scope, receive, send)  # probes and /v1/models are not chat requests
            return
        status = "499"

        async def observe(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception as e:
            status = "499" if isinstance(e, CLIENT_GONE) else "500"
            raise
        except asyncio.CancelledError:  # Serve cancelled it mid-stream: the client hung up
            status = "499"
            raise
        finally:
            status = str(scope.get(STREAM_ERROR, status))
            self.metrics.requests.inc(1, tags={"status": status})
