"""The Ray Serve application: an OpenAI-compatible ingress in front of autoscaled engine replicas.

Routes: POST /v1/chat/completions (whole or streamed as SSE ending `data: [DONE]`),
GET /v1/models, GET /v1/models/{id}, GET /healthz. Every error is an OpenAI-shaped JSON body,
never a stack trace.
Message text is never logged unless serve.debug_log_content is set: the ingress logs request
ids, sizes and token counts, and Serve's access log holds method, route, status and latency.

`build_app` is the Serve application builder (`import_path: soulray.serve.app:build_app`, args
`{config: <soulray config>}`), used by `soulray serve`, `serve deploy` and a KubeRay RayService.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from soulray.config import AuthConfig, Config, ServeConfig
from soulray.data.render import control_token_pattern
from soulray.data.tokenizer import load_tokenizer
from soulray.safety.screen import build_screen
from soulray.serve.chat import IngressState, Prepared, complete, open_stream, prepare
from soulray.serve.engine import (
    EngineClient,
    VLLMClient,
    as_deployment,
    build_engine,
    build_local_engine,
    replica_options,
)
from soulray.serve.fetch import fetch_model_dir
from soulray.serve.metrics import (
    CLIENT_GONE,
    STREAM_ERROR,
    IngressMetrics,
    add_request_metrics,
)
from soulray.serve.params import parse_chat_request
from soulray.serve.prompt import read_export_info
from soulray.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    new_completion_id,
)

log = logging.getLogger("ray.serve.soulray")  # a child of Serve's logger: lands in replica logs


def load_api_key(auth: AuthConfig) -> str | None:
    """The bearer key: the secret file if configured, else the env var; None = open."""
    key = None
    if auth.api_key_file:
        path = Path(auth.api_key_file).expanduser()  # as replicas read it (storage.normalize)
        if path.exists():
            key = path.read_text(encoding="utf-8").strip() or None
    key = key or os.environ.get(auth.api_key_env, "").strip() or None
    if key is None and auth.api_key_file:
        # a secret that was not mounted (or a typo) must not leave the server open
        raise ValueError(
            f"serve.auth.api_key_file {auth.api_key_file} does not exist or is empty, and the "
            f"environment variable {auth.api_key_env} is not set: the server would run without "
            "auth; put the key in that file, or unset serve.auth.api_key_file to serve openly"
        )
    if key is None and auth.required:
        raise ValueError(
            "serve.auth.required is set but no API key was found: put the key in the "
            f"environment variable {auth.api_key_env} or in the file serve.auth.api_key_file "
            f"({auth.api_key_file})"
        )
    return key


def build_state(cfg: ServeConfig, model_dir: str, engine: EngineClient) -> IngressState:
    wait_s = cfg.wait_for_model_s  # a RayService may start before its RayJob has exported
    local = fetch_model_dir(model_dir, weights=False, wait_s=wait_s)  # the ingress: no weights
    tokenizer = load_tokenizer(local)
    adapter_dir = cfg.engine.adapter_dir
    adapter = fetch_model_dir(adapter_dir, weights=False, wait_s=wait_s) if adapter_dir else None
    info = read_export_info(local, cfg, tokenizer, adapter)
    created = int(Path(local, "config.json").stat().st_mtime)
    screen = build_screen(cfg.safety)
    # one thread, and no more: the screen's result cache and the classifier's last embedding
    # (Classifier._embed) are unlocked, and every screening of the replica runs here
    thread = ThreadPoolExecutor(1, "crisis-screen") if cfg.safety.enabled else None
    return IngressState(
        cfg,
        info,
        tokenizer,
        screen,
        load_api_key(cfg.auth),
        engine,
        created,
        screen_thread=thread,
        control_tokens=control_token_pattern(tokenizer),
    )


@serve.ingress()
class Ingress:
    """The ingress deployment: auth, validation, safety, window; generation is the engine's."""

    def __init__(self, config: dict[str, Any], engine: DeploymentHandle | None = None) -> None:
        cfg = Config.model_validate(config)
        client = build_engine_client(cfg, engine)
        self.state = build_state(cfg.serve, cfg.serve_model_dir, client)
        log.info(
            "ingress ready: model %s, context %d tokens, strategy tags %s, auth %s",
            cfg.serve.model_name,
            self.state.info.context_tokens,
            self.state.info.strategy_tags,
            "on" if self.state.api_key else "off",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.state, IngressMetrics())

    def counters(self) -> dict[str, Any]:
        """The in-process engine's counters (serve.layout=one_deployment)."""
        engine = getattr(self.state.engine, "engine", None)
        return engine.counters() if engine is not None else {}


def build_engine_client(cfg: Config, engine: DeploymentHandle | None) -> EngineClient:
    """How the ingress reaches its engine: in this process (one deployment) or by handle."""
    if engine is None:
        return build_local_engine(cfg.serve, cfg.serve_model_dir)
    if cfg.serve.engine.kind == "vllm":
        return VLLMClient(engine, cfg.serve.model_name)
    return EngineClient(engine)


def build_api(state: IngressState, metrics: IngressMetrics | None = None) -> FastAPI:
    """The FastAPI app of one ingress replica (routes close over its state); with `metrics`
    (inside a replica) every response is counted by status."""
    api = FastAPI(title="soulray", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(api)
    if metrics is not None:
        add_request_metrics(api, metrics)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(state, request)
        cards = [ModelCard(id=name, created=state.created) for name in model_names(state.cfg)]
        return ModelList(data=cards).model_dump()

    @api.get("/v1/models/{model:path}")  # the openai client's models.retrieve
    async def model_card(model: str, request: Request) -> dict[str, Any]:
        authorize(state, request)
        check_model(state.cfg, model)
        return ModelCard(id=model, created=state.created).model_dump()

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(state, request)
        body = await read_body(request, state.cfg.max_request_bytes)
        req = parse_request(body, state.cfg.ignore_unknown_fields)
        # absent: the served model; "" is a name, and no model has it (404, as OpenAI's API)
        model = state.cfg.model_name if req.model is None else req.model
        check_model(state.cfg, model)
        prepared = await state.off_loop(prepare, state, req, new_completion_id())
        if model != state.cfg.model_name:
            prepared.gen.adapter = model  # a serve.adapters name: the engine applies its LoRA
        if not req.stream:
            return (await complete(state, prepared, model)).model_dump()
        events = await open_stream(state, prepared, model)
        return ClosingStreamingResponse(events, prepared)

    return api


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its events when it ends, however it ends. Starlette
    never closes the iterator: a client that hangs up while a send is pending (ClientDisconnect,
    or Serve cancelling the request) would leave the reply generating until garbage collection.
    A stream that failed after its 200 was sent leaves its error's status in the scope, where
    the request counter (metrics.py) counts it instead of the 200."""

    def __init__(self, events: Any, prepared: Prepared) -> None:
        # no proxy may cache or buffer the stream (nginx, the k8s ingress, buffers by default)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.prepared = prepared

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def receive_or_disconnect() -> dict:
            # Serve cancels the request of a client that hung up, and with it (ray.cancel is
            # recursive) the replica's pending call to the proxy for the next ASGI message: its
            # TaskCancelledError then comes out of `receive` instead of http.disconnect. It is
            # the same hang-up, so the response ends as on a disconnect (the stream closed, a
            # 499 counted), not with an error, which Serve may no longer be there to collect
            # ("Task exception was never retrieved" in the replica's log).
            try:
                return await receive()
            except CLIENT_GONE:
                return {"type": "http.disconnect"}

        try:
            await super().__call__(scope, receive_or_disconnect, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:  # first: a stream closed before its end records a 499
                await close()
            if self.prepared.stream_error is not None:
                scope[STREAM_ERROR] = self.prepared.stream_error


def model_names(cfg: ServeConfig) -> list[str]:
    """The base model's name, then each serve.adapters name."""
    return [cfg.model_name] + [a.name for a in cfg.adapters]


def check_model(cfg: ServeConfig, model: str) -> None:
    """A 404 naming the served models for any other name."""
    if model not in model_names(cfg):
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves "
            f"{', '.join(map(repr, model_names(cfg)))} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        # what was refused, not the message: a client's text may be quoted in it
        log.info("refused: %s %s (param %s, code %s)", e.status, e.type, e.param, e.code)
        headers = {"Retry-After": "1"} if e.status == 503 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        body = APIError(e.status_code, str(e.detail)).body()
        return JSONResponse(body, status_code=e.status_code)

    @api.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        if isinstance(e, CLIENT_GONE):
            # Serve cancels a request whose client hung up: nothing failed, nobody reads this
            log.info("request cancelled (the client went away): its generation was stopped")
            body = APIError(499, "client closed the request", type="cancelled").body()
            return JSONResponse(body, status_code=499)
        log.error("internal error: %s", type(e).__name__)  # no message: it may quote content
        body = APIError(500, "internal server error", type="server_error").body()
        return JSONResponse(body, status_code=500)


def authorize(state: IngressState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    valid = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), state.api_key.encode()
    )
    if not valid:
        raise APIError(
            401,
            "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


async def read_body(request: Request, limit: int) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json" and not kind.endswith("+json"):
        # as FastAPI does for JSON bodies: a form or text/plain post (which a web page can make
        # cross-site without a preflight) is not read as a request
        raise APIError(
            415,
            f"the request body must be JSON: send the header 'Content-Type: application/json', "
            f"not {kind!r}",
            param="Content-Type",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(limit)
    return body


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is over this server's limit of {limit} bytes (serve.max_request_bytes)",
        code="request_too_large",
    )


def parse_request(body: bytes, ignore_unknown: bool = False) -> ChatCompletionRequest:
    """The request model, or a 400 naming the field (never echoing the content); a field the
    OpenAI API does not have is refused by name unless `ignore_unknown`."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at {e.pos})") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return parse_chat_request(data, ignore_unknown)


def build_application(cfg: Config) -> Any:
    """The engine deployment(s) and the ingress, bound together (pass it to serve.run)."""
    cfg = resolved(cfg)
    level = "DEBUG" if cfg.serve.debug_log_content else "INFO"
    logging_config = {"log_level": level, "enable_access_log": True}
    # The proxy answers a request past the ingress's max_queued_requests itself (503, plain
    # text): with the Retry-After our own 503s send, so that clients back off as for those
    backpressure = BackpressureConfig(retry_after_s=1)
    extra = {"logging_config": logging_config, "backpressure_config": backpressure}
    if cfg.serve.resolved_layout() == "one_deployment":  # never vllm: ServeConfig refuses it
        options = replica_options(cfg.serve.engine, "Ingress")
        ingress = as_deployment(Ingress).options(**options, **extra)
        return ingress.bind(cfg.model_dump(mode="json"))
    engine = build_engine(cfg.serve, cfg.serve_model_dir)
    options = replica_options(cfg.serve.ingress, "Ingress")
    ingress = as_deployment(Ingress).options(**options, **extra)
    return ingress.bind(cfg.model_dump(mode="json"), engine)


def resolved(cfg: Config) -> Config:
    """The config with serve.engine.model_dir set and every local path the replicas read made
    absolute (a replica under `serve deploy` or KubeRay runs in another directory)."""
    from soulray import storage

    out = cfg.model_copy(deep=True)
    out.serve.engine.model_dir = storage.normalize(cfg.serve_model_dir)
    if out.serve.engine.adapter_dir:
        out.serve.engine.adapter_dir = storage.normalize(out.serve.engine.adapter_dir)
    if out.serve.auth.api_key_file:
        out.serve.auth.api_key_file = storage.normalize(out.serve.auth.api_key_file)
    for adapter in out.serve.adapters:
        adapter.path = storage.normalize(adapter.path)
    return out


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: args = {"config": <a soulray config mapping>}."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; pass only `config`")
    return build_application(Config.model_validate(args.get("config") or {}))


def build_serve_config(cfg: Config) -> dict[str, Any]:
    """A Ray Serve config file (the format `serve deploy` and a RayService's serveConfigV2 take).
    It embeds only the serve section, with the model directory resolved."""
    serve_only = Config(serve=resolved(cfg).serve)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.serve.port},
        "applications": [
            {
                "name": cfg.serve.app_name,
                "route_prefix": "/",
                "import_path": "soulray.serve.app:build_app",
                "args": {"config": {"serve": serve_only.serve.model_dump(mode="json")}},
            }
        ],
    }


def check_serve_port(cfg: Config) -> Any:
    """The running Serve's client, or None; with none, serve.port must be free on this node (a
    running Serve holds its own port)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None and hosts_a_node():
        check_port_free(cfg.serve.host, cfg.serve.port)
    return client


def start_serving(cfg: Config) -> str:
    """Deploy the app on the current Ray cluster (non-blocking); return its base URL."""
    client = check_serve_port(cfg)
    port = cfg.serve.port if client is None else running_port(client.http_config.port, cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    running = serve.status().applications.get(cfg.serve.app_name)
    if running is not None:
        log.warning(
            "serve.app_name=%s is deployed on this cluster already (%s): this deploy replaces "
            "it (its replicas finish their requests first)",
            cfg.serve.app_name,
            running.status,
        )
    try:
        serve.run(build_application(cfg), name=cfg.serve.app_name, route_prefix="/")
    except Exception as e:
        if "is being used by application" not in str(e):
            raise
        other = str(e).split('application "', 1)[-1].split('"', 1)[0]
        raise ValueError(
            f"serve.app_name={cfg.serve.app_name}: this Ray cluster already serves the "
            f"application {other!r} at the route prefix /, where a soulray app serves (one per "
            f"cluster): redeploy it under its own name (serve.app_name={other}), serve more "
            "models from one app with serve.adapters, or use another Ray cluster"
        ) from None
    record_deploy(cfg.serve.app_name)
    return served_url(cfg, port)


def record_deploy(app_name: str) -> None:
    """Mark the app as deployed by this process, in the cluster's key-value store: a `soulray
    serve` stopped later leaves alone an app another one has deployed since (cli.py)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _DEPLOYS[app_name] = uuid.uuid4().hex
    _internal_kv_put(f"deployer/{app_name}", _DEPLOYS[app_name], namespace="soulray")


def deployed_here_last(app_name: str) -> bool:
    """Whether this process made the app's latest soulray deploy (True when it made none: a
    process that deployed nothing decides nothing)."""
    from ray.experimental.internal_kv import _internal_kv_get

    if app_name not in _DEPLOYS:
        return True
    last = _internal_kv_get(f"deployer/{app_name}", namespace="soulray")
    return last is None or last.decode() == _DEPLOYS[app_name]


_DEPLOYS: dict[str, str] = {}  # app name -> the id of this process's latest deploy of it


def served_url(cfg: Config, port: int | None = None) -> str:
    """The base URL the app answers at on this machine: the port of the Serve running on the
    cluster (`port`, else asked of Serve; serve.port before it runs)."""
    import ray
    from ray.serve.context import _get_global_client

    if port is None:
        # without a Ray connection (the app is not deployed here): serve.port; asking Serve
        # would connect to RAY_ADDRESS's cluster, and wait for it
        client = (
            _get_global_client(raise_if_no_controller_running=False)
            if ray.is_initialized()
            else None
        )
        port = cfg.serve.port if client is None else client.http_config.port
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{port}"


def running_port(running: int, cfg: Config) -> int:
    """The port of a Serve already running on the cluster, where the app is served: Serve keeps
    the one it started with (serve.start ignores another), so the URL must name that one."""
    if running != cfg.serve.port:
        log.warning(
            "serve.port=%d is not applied: this Ray cluster's Serve already listens on port %d "
            "and keeps it until it is shut down (`serve shutdown` stops every app), so the app "
            "is served there",
            cfg.serve.port,
            running,
        )
    return running


def hosts_a_node() -> bool:
    """Whether this machine runs a node of the current Ray cluster: Serve's proxies bind the
    port on the cluster's nodes, so a driver that joined a remote cluster has none to check.
    Before Ray is started (serve.start then starts one here): yes."""
    import ray

    if not ray.is_initialized():
        return True
    here = ray.util.get_node_ip_address()
    return any(n["Alive"] and n["NodeManagerAddress"] == here for n in ray.nodes())


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. Serve's proxy binds with SO_REUSEPORT, so on
    a port another server holds (another Ray's Serve, another user's) it starts without an
    error, and the kernel then splits the requests between the two servers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections: free
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"serve.port={port} is in use on {host} ({e.strerror}): another server listens "
                "there; stop it or pick a free port with serve.port=..."
            ) from None
