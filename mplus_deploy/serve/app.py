"""The ``mplus-serve`` application: ``create_app(engine, store_dir, ...)`` → a FastAPI app (docs/serving.md).

In front of every route, one ASGI gate (``Gate``), in this order:
1. auth: with an API key every route but ``/health`` needs ``Authorization: Bearer KEY`` (401 otherwise;
   compared in constant time);
2. body size: a body over ``max_body`` bytes is refused with 413 before the route runs (``Content-Length``
   checked first; the body is then read by the gate, counted as it arrives, and handed to the route);
3. admission: at most ``max_queue`` generation and memory requests are in the server at once (running or
   waiting for their memory's lock); one more is answered 429 at once. A streamed answer holds its place
   until its last byte.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from . import errors
from .generation import router as generation_router
from .memory_api import router as memory_router
from .metrics import Metrics
from .store import MemoryStore

ADMITTED = ("/v1/completions", "/v1/chat/completions", "/v1/memory/")


@dataclass
class ServeState:
    engine: object
    store: MemoryStore
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    started: int = field(default_factory=lambda: int(time.time()))


class Gate:
    def __init__(self, app, api_key: str | None, max_body: int, max_queue: int, metrics: Metrics):
        self.app, self.key, self.max_body, self.max_queue, self.metrics = app, api_key, max_body, max_queue, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key and path != "/health":
            got = headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.key}".encode()):
                return await _send(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send(send, 413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body} "
                                          "bytes (mplus-serve --max-body-mb)", "body_too_large")
        admitted = path.startswith(ADMITTED)
        if admitted:
            if self.in_flight >= self.max_queue:
                return await _send(send, 429, f"the server is busy ({self.in_flight} requests in progress, limit "
                                              f"{self.max_queue}); retry later", "queue_full")
            self.in_flight += 1
            self.metrics.queue.set(self.in_flight)
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):  # read (and bound) the body before the route runs
                chunks, seen = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    seen += len(msg.get("body", b""))
                    if seen > self.max_body:
                        return await _send(send, 413, f"request body exceeds the limit of {self.max_body} bytes "
                                                      "(mplus-serve --max-body-mb)", "body_too_large")
                    chunks.append(msg.get("body", b""))
                    if not msg.get("more_body", False):
                        break
                body, replayed = b"".join(chunks), False

                async def receive_body():
                    nonlocal replayed
                    if replayed:
                        return await receive()
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
            else:
                receive_body = receive

            async def sending(msg):
                if msg["type"] == "http.response.start":
                    self.metrics.requests.labels(_route(path), str(msg["status"])).inc()
                await send(msg)

            await self.app(scope, receive_body, sending)
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.queue.set(self.in_flight)


ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _route(path: str) -> str:
    """The metrics label of a path: a known route, ``/v1/memory/{id}``, or ``other`` (bounded cardinality)."""
    if path.startswith("/v1/memory/"):
        return "/v1/memory/{id}"
    return path if path in ROUTES else "other"


async def _send(send, status: int, message: str, code: str) -> None:
    body = json.dumps(errors.body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _default_name(engine) -> str:
    """An artifact's directory name (``mplus-export demo -o out/demo`` → ``demo``), else the source's name."""
    src = engine.source
    return (src.root.name if src.root is not None else src.name) or "mplus"


def widen_thread_pool(max_queue: int) -> None:
    """Sync routes run in anyio's worker threads of the running event loop; each admitted request may wait there
    on its memory's lock, so the pool must outnumber the admission limit or waiting requests starve the others."""
    import anyio.to_thread

    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, max_queue + 8)


def create_app(engine, store_dir, *, api_key: str | None = None, model_name: str | None = None,
               max_resident: int = 8, max_queue: int = 64, max_body: int = 64 << 20, seed: int | None = 0) -> FastAPI:
    """The server over an open ``runtime.Engine``. ``seed`` seeds the drop generator of every new memory (as
    ``Engine.session(seed=...)``), so a user's memory is reproducible from its memorize calls."""
    store = MemoryStore(engine, store_dir, max_resident=max_resident, seed=seed)
    state = ServeState(engine, store, model_name or _default_name(engine))
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        widen_thread_pool(max_queue)
        yield

    app = FastAPI(title="mplus-serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.serve = state
    app.state.max_queue = max_queue
    errors.install(app)
    app.include_router(generation_router)
    app.include_router(memory_router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "memories": len(store.ids()),
                "resident": len(store.resident())}

    @app.get("/metrics")
    def metrics(request: Request):
        state.metrics.memory_rows(store.resident_stats())
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(Gate, api_key=api_key, max_body=max_body, max_queue=max_queue, metrics=state.metrics)
    return app
