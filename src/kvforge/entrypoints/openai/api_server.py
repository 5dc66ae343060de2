"""The HTTP server: FastAPI routes over AsyncLLM, OpenAI error bodies, auth, limits, drain."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kvforge
from kvforge.async_engine import AsyncLLM
from kvforge.entrypoints.openai.metrics import ServerMetrics
from kvforge.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    GenerateRequest,
    TokenizeRequest,
)
from kvforge.entrypoints.openai.serving import ChatServing
from kvforge.errors import KVForgeError

logger = logging.getLogger("kvforge.server")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}
PUBLIC_PATHS = {"/health"}


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-level settings of ``kvforge serve``."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = 16 << 20
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    body = {
        "error": {
            "message": message,
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


def build_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``llm``."""
    app = FastAPI(title="kvforge", version=kvforge.__version__)
    metrics = ServerMetrics(llm)
    serving = ChatServing(llm, list(config.served_model_names), metrics)
    app.state.llm, app.state.draining, app.state.config = llm, False, config
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    app.add_middleware(GuardMiddleware, config=config, state=app.state)

    @app.exception_handler(KVForgeError)
    async def kvforge_error(_: Request, exc: KVForgeError) -> JSONResponse:
        return error_response(exc.http_status, str(exc), getattr(exc, "param", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return error_response(400, f"{location + ': ' if location else ''}{message}", location)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    def respond(result: dict[str, Any] | list[Any] | AsyncIterator[str]) -> Response:
        if isinstance(result, (dict, list)):
            return JSONResponse(result)
        return StreamingResponse(_first_error_as_event(result), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        if not llm.is_healthy or app.state.draining:
            return error_response(
                503, "the engine is not running" if not llm.is_healthy else "shutting down"
            )
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kvforge.__version__}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "kvforge",
                    "max_model_len": llm.engine.max_model_len,
                }
                for name in config.served_model_names
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return respond(await serving.completions(body))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return respond(await serving.chat(body))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        return respond(await serving.embeddings(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return respond(serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return respond(serving.detokenize(body))

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> Response:
        return respond(await serving.generate(body))

    return app


async def _first_error_as_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Stream events; an error after the headers went out becomes an error event."""
    try:
        async for event in events:
            yield event
    except KVForgeError as exc:
        body = {
            "error": {
                "message": str(exc),
                "type": _ERROR_TYPES.get(exc.http_status, "server_error"),
                "param": getattr(exc, "param", None),
                "code": exc.http_status,
            }
        }
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def serve(llm: AsyncLLM, config: ServerConfig, host: str, port: int) -> None:
    """Run the server until SIGINT / SIGTERM; SIGTERM drains in-flight requests first."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM starts a drain instead of uvicorn's immediate shutdown (and exits 0)."""

        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and self.loop is not None:
                self.loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(_drain(app, llm, self, config))
                )
                return
            super().handle_exit(sig, frame)

    app = build_app(llm, config)
    server = DrainingServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
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
