"""The HTTP server: FastAPI routes over AsyncLLM, OpenAI error bodies, auth, limits, drain."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kvforge
from kvforge.async_engine import AsyncLLM
from kvforge.entrypoints.openai.clip_serving import ClipServing
from kvforge.entrypoints.openai.metrics import ServerMetrics
from kvforge.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingPart,
    EmbeddingRequest,
    GenerateRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)
from kvforge.entrypoints.openai.serving import ChatServing
from kvforge.errors import (
    AuthenticationError,
    InvalidRequestError,
    KVForgeError,
    ModelNotFoundError,
)
from kvforge.lora.request import LoRARequest
from kvforge.utils import one_line

logger = logging.getLogger("kvforge.server")
T = TypeVar("T")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}
# the chat page and the preset list load before a browser user has entered the API key
PUBLIC_PATHS = {"/health", "/", "/v1/presets"}
CHAT_PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-level settings of ``kvforge serve``."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = 16 << 20
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0
    # Connection hygiene: a request's headers and body must arrive within this many seconds
    # (slowloris); idle keep-alive connections close after timeout_keep_alive; beyond
    # limit_concurrency open connections and tasks uvicorn answers 503.
    timeout_header_read: float = 10.0
    timeout_keep_alive: int = 5
    limit_concurrency: int = 512
    # LoRA adapters served by name (``model: <name>``), loaded at start.
    lora_modules: tuple[LoRARequest, ...] = ()
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter: off unless allowed; paths must
    # lie under lora_root, and the X-Admin-Key header must carry admin_key.
    allow_runtime_lora: bool = False
    lora_root: str | None = None
    admin_key: str | None = None
    # a CLIP checkpoint directory served next to the language model (embeddings, classify)
    clip_path: str | None = None
    # the sampling preset of requests that name none (kvforge serve --preset code)
    default_preset: str | None = None
    # one JSON object per HTTP request on stderr (method, path, status, duration, client)
    json_access_log: bool = False

    def check(self) -> None:
        """Refuse runtime adapter loading without a root and an admin key."""
        if self.allow_runtime_lora and not (self.lora_root and self.admin_key):
            raise InvalidRequestError(
                "--allow-runtime-lora needs --lora-root (where adapters may be loaded from) "
                "and --admin-key (what the load / unload requests must present)"
            )


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body (the message on one line)."""
    body = {
        "error": {
            "message": one_line(message),
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": status,
        }
    }
    return JSONResponse(body, status_code=status)


class GuardMiddleware:
    """Drain (503), API key (401) and body size (413) checks as plain ASGI.

    NOTE: plain ASGI rather than Starlette's BaseHTTPMiddleware, which would hide client
    disconnects from streaming responses (and so never abort their requests).
    """

    def __init__(self, app: ASGIApp, config: ServerConfig, state: Any) -> None:
        self.app, self.config, self.state = app, config, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        rejection = self._check(Headers(scope=scope))
        if rejection is None and "content-length" not in Headers(scope=scope):
            receive, rejection = await self._buffer_body(receive)
        if rejection is not None:
            return await rejection(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, headers: Headers) -> JSONResponse | None:
        config = self.config
        if self.state.draining:
            return error_response(503, "the server is shutting down")
        if config.api_key is not None:
            header = headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                return error_response(401, "invalid or missing API key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_request_bytes:
            return error_response(
                413, f"request body of {length} bytes exceeds {config.max_request_bytes}"
            )
        return None

    async def _buffer_body(self, receive: Receive) -> tuple[Receive, JSONResponse | None]:
        """Read a body of unknown length up to the limit, then replay it."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.config.max_request_bytes:
                return receive, error_response(
                    413, f"request body exceeds {self.config.max_request_bytes} bytes"
                )
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay, None


class AccessLogMiddleware:
    """One JSON line per HTTP request on stderr, written when its response has been sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log = logging.getLogger("kvforge.access")
        if not self.log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(handler)
            self.log.propagate = False
            self.log.setLevel(logging.INFO)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "bytes": 0}

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client") or ("", 0)
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status["code"],
                "bytes": status["bytes"],
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                "client": client[0],
            }
            self.log.info(json.dumps(entry))


def build_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``llm``."""
    app = FastAPI(title="kvforge", version=kvforge.__version__)
    metrics = ServerMetrics(llm)
    config.check()
    serving = ChatServing(llm, list(config.served_model_names), metrics, config.lora_modules)
    serving.default_preset = config.default_preset
    clip = ClipServing(llm, config.clip_path) if config.clip_path else None
    app.state.llm, app.state.draining, app.state.config = llm, False, config
    # NOTE: the last middleware added is the outermost. CORS wraps the guard, so a browser's
    # preflight is answered before the API key is checked and a 401 carries CORS headers.
    app.add_middleware(GuardMiddleware, config=config, state=app.state)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    if config.json_access_log:  # outermost: refused requests are logged too
        app.add_middleware(AccessLogMiddleware)

    @app.exception_handler(KVForgeError)
    async def kvforge_error(_: Request, exc: KVForgeError) -> JSONResponse:
        return error_response(exc.http_status, str(exc), getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequestError):  # raised by one of our validators
            return error_response(400, str(cause), cause.param)
        location = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        return error_response(400, f"{location + ': ' if location else ''}{message}", location)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def respond(request: Request, work: Awaitable[Any]) -> Response:
        result = await _unless_disconnected(request, work)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, (dict, list)):
            # Rendered in the worker pool: a large body (2,048 embeddings) must not hold the loop.
            body = await llm.offload(_render_json, result)
            return Response(body, media_type="application/json")
        return StreamingResponse(_first_error_as_event(result), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        if not llm.is_healthy or app.state.draining:
            return error_response(
                503, "the engine is not running" if not llm.is_healthy else "shutting down"
            )
        return Response(status_code=200)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text())

    @app.get("/v1/presets")
    async def list_presets() -> dict[str, Any]:
        from kvforge import presets

        data = [
            {"name": p.name, "kind": p.kind, "use": p.use, "values": p.values, "reasons": p.reasons}
            for p in [*presets.SAMPLING.values(), *presets.SERVING.values()]
        ]
        return {"object": "list", "data": data}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kvforge.__version__}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        base = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "kvforge",
                "root": name,
                "parent": None,
                "max_model_len": llm.engine.max_model_len,
            }
            for name in config.served_model_names
        ]
        adapters = [
            {
                "id": lora.lora_name,
                "object": "model",
                "created": created,
                "owned_by": "kvforge",
                "root": lora.lora_path,
                "parent": config.served_model_names[0],
                "max_model_len": llm.engine.max_model_len,
            }
            for lora in serving.loras.values()
        ]
        if clip is not None:
            base.append(
                {"id": clip.name, "object": "model", "created": created, "owned_by": "kvforge"}
            )
        return {"object": "list", "data": base + adapters}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request, body: LoadLoRARequest) -> Response:
        _check_admin(request, config)
        await serving.load_lora(body.lora_name, body.lora_path, body.scale, config.lora_root)
        return Response(f"loaded LoRA adapter {body.lora_name}", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request, body: UnloadLoRARequest) -> Response:
        _check_admin(request, config)
        await serving.unload_lora(body.lora_name)
        return Response(f"unloaded LoRA adapter {body.lora_name}", media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await respond(request, serving.completions(body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await respond(request, serving.chat(body))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
        parts = isinstance(body.input, list) and any(
            isinstance(i, EmbeddingPart) for i in body.input
        )
        if clip is not None and (parts or body.model == clip.name):
            return await respond(request, clip.embeddings(body))
        if parts:
            raise InvalidRequestError("image and text parts need a CLIP model (--clip)", "input")
        return await respond(request, serving.embeddings(body))

    @app.post("/v1/classify")
    async def classify(request: Request, body: ClassifyRequest) -> Response:
        if clip is None:
            raise ModelNotFoundError("no CLIP model is served: start the server with --clip")
        if body.model not in (None, clip.name):
            raise ModelNotFoundError(f"the CLIP model here is {clip.name!r}, not {body.model!r}")
        return await respond(request, clip.classify(body))

    @app.post("/tokenize")
    async def tokenize(request: Request, body: TokenizeRequest) -> Response:
        return await respond(request, serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(request: Request, body: DetokenizeRequest) -> Response:
        return await respond(request, serving.detokenize(body))

    @app.post("/generate")
    async def generate(request: Request, body: GenerateRequest) -> Response:
        return await respond(request, serving.generate(body))

    return app


def _check_admin(request: Request, config: ServerConfig) -> None:
    """Runtime adapter loading: allowed by the server and authorized by the admin key."""
    if not config.allow_runtime_lora:
        raise ModelNotFoundError(
            "loading adapters at run time is off (start the server with --allow-runtime-lora)"
        )
    assert config.admin_key is not None  # ServerConfig.check
    presented = request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(presented.encode(), config.admin_key.encode()):
        raise AuthenticationError("invalid or missing X-Admin-Key")


def _render_json(content: Any) -> bytes:
    """JSON bytes as Starlette's JSONResponse renders them."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` unless the client disconnects first; then cancel it (which aborts its
    engine requests) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    logger.info("client disconnected: cancelling its request")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _first_error_as_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Stream events; an error after the headers went out becomes an error event."""
    try:
        async for event in events:
            yield event
    except KVForgeError as exc:
        body = {
            "error": {
                "message": one_line(str(exc)),
                "type": _ERROR_TYPES.get(exc.http_status, "server_error"),
                "param": getattr(exc, "param", None),
                "code": exc.http_status,
            }
        }
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def serve(llm: AsyncLLM, config: ServerConfig, host: str, port: int) -> int:
    """Run the server until SIGINT / SIGTERM; SIGTERM drains in-flight requests first.

    Returns the exit code: 0 after a signal, 1 when the engine loop died (a fault no request
    could be blamed for), so that a supervisor restarts the process.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM starts a drain instead of uvicorn's immediate shutdown (and exits 0)."""

        loop: asyncio.AbstractEventLoop | None = None
        engine_died = False

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            watch = asyncio.ensure_future(self._watch_engine())
            try:
                await super().serve(sockets)
            finally:
                watch.cancel()

        async def _watch_engine(self) -> None:
            while not self.should_exit:
                if llm.error is not None:
                    logger.error("the engine loop died (%s): shutting down", llm.error)
                    self.engine_died = True
                    app.state.draining = True
                    self.should_exit = True
                    return
                await asyncio.sleep(0.2)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and self.loop is not None:
                self.loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(_drain(app, llm, self, config))
                )
                return
            super().handle_exit(sig, frame)

    app = build_app(llm, config)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=1,
            http=_read_timeout_protocol(config.timeout_header_read),
            timeout_keep_alive=config.timeout_keep_alive,
            limit_concurrency=config.limit_concurrency,
        )
    )
    logger.info(
        "serving %s on http://%s:%d (OpenAI API under /v1)",
        ", ".join(config.served_model_names),
        host,
        port,
    )
    try:
        server.run()
    finally:
        llm.shutdown()
    return 1 if server.engine_died else 0


def _read_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request has not fully arrived
    ``seconds`` after the connection opened or the previous response ended (uvicorn itself
    waits for headers forever, so slow clients could hold every connection)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutProtocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(seconds, self._on_read_timeout)

        def _on_read_timeout(self) -> None:
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

    return ReadTimeoutProtocol


async def _drain(app: FastAPI, llm: AsyncLLM, server: Any, config: ServerConfig) -> None:
    if app.state.draining:
        return
    app.state.draining = True
    logger.info(
        "SIGTERM: refusing new requests, draining %d in flight (up to %.0fs)",
        llm.num_active,
        config.shutdown_timeout,
    )
    idle = await asyncio.get_running_loop().run_in_executor(
        None, llm.wait_idle, config.shutdown_timeout
    )
    if not idle:
        logger.warning("shutdown timeout: aborting %d requests", llm.num_active)
    llm.shutdown()
    server.should_exit = True
