"""``mplus-serve OUT --ray --replicas N``: mplus-serve's routes on Ray Serve, one Engine per replica, requests
routed by memory id (docs/serving.md "Ray Serve").

Two deployments:

- ``Gateway`` (the HTTP ingress, one replica): reads each request's memory id (the ``user`` of a completion, the
  ``{id}`` of ``/v1/memory/{id}/...``; none for ``/v1/models``, ``/health``, ``/metrics``) and forwards the raw
  request to ``EngineReplica`` through a handle with ``multiplexed_model_id=id``, so Ray Serve sends an id to a
  replica that already has it loaded (``@serve.multiplexed``). The answer streams back chunk by chunk.
- ``EngineReplica`` (``--replicas`` of them): each opens the artifact once and the shared store directory
  (``MemoryStore``; its rules for several processes on one store: per-id ``flock``, stale resident sessions
  reloaded), and runs each request through the single-process app (``create_app``) in-process, ASGI to ASGI:
  routes, validation, auth, errors and streaming are exactly those of ``mplus-serve`` without ``--ray``.

Durability: a memorize is answered only after the store committed it (serve.store), so Ray's LRU unloading of an
id (``max_num_models_per_replica`` = ``--max-resident``) writes nothing, and a replica that dies loses nothing
acknowledged: its ids load from the store on whichever replica Ray routes them to next. Several machines need
the store on a filesystem they share with working ``flock`` (NFSv4, CephFS); each replica needs the artifact.
"""
# no `from __future__ import annotations`: Ray Serve's ingress rebuilds the routes' signatures and FastAPI then
# reads string annotations as query parameters (every request answered 422)

import asyncio
import json
from dataclasses import dataclass, field

from .ids import ID_RE

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - the optional [ray] extra
    raise ImportError(f"mplus-serve --ray needs Ray Serve: pip install 'mplus-deploy[ray]' ({e})") from None

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

MEMORY_PREFIX = "/v1/memory/"
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


def memory_id(path: str, body: bytes) -> str:
    """The memory id a request is about ('' when none or not a valid id: the replica's app answers those)."""
    mid = ""
    if path.startswith(MEMORY_PREFIX):
        mid = path[len(MEMORY_PREFIX):].split("/", 1)[0]
    elif path in GENERATION_ROUTES and body:
        try:
            user = json.loads(body).get("user")
        except (ValueError, AttributeError):
            user = None
        mid = user if isinstance(user, str) else ""
    return mid if ID_RE.fullmatch(mid or "") else ""


async def asgi_call(app, req: dict):
    """Run one request ``{method, path, query, headers: [[k, v]], body}`` through the ASGI ``app``; yields the head
    ``{"status", "headers"}`` first, then the body chunks (bytes) as the app sends them."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
             "scheme": "http", "path": req["path"], "raw_path": req["path"].encode(), "root_path": "",
             "query_string": req["query"].encode(), "client": ("ray-gateway", 0), "server": ("mplus-replica", 0),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req["headers"]]}
    queue: asyncio.Queue = asyncio.Queue()
    delivered, done = False, asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": req["body"], "more_body": False}
        await done.wait()  # the client never disconnects from this side: wait until the response is over
        return {"type": "http.disconnect"}

    async def send(msg):
        await queue.put(msg)

    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                if task.exception() is not None:
                    raise task.exception()
                if queue.empty():
                    raise RuntimeError(f"{req['method']} {req['path']}: the app ended without a complete response")
                continue
            msg = get.result()
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    return
    finally:
        done.set()
        if not task.done():
            task.cancel()


@dataclass
class ReplicaConfig:
    """What every replica opens: the artifact, the Engine's options, the shared store and ``create_app``'s options."""
    artifact: str
    store: str
    engine: dict = field(default_factory=dict)
    app: dict = field(default_factory=dict)


class _Loaded:
    """What ``@serve.multiplexed`` holds for one id; unloading it drops the id's resident session (nothing to
    write: its last acknowledged state is in the store)."""

    def __init__(self, store, mid: str):
        self.store, self.mid = store, mid

    def __del__(self):
        try:
            self.store.discard(self.mid)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to release
            pass


def build_app(cfg: ReplicaConfig, replicas: int, max_resident: int = 8, replica_cpus: float = 1.0):
    """The Ray Serve application (``serve.run(build_app(...))``): a ``Gateway`` over ``replicas`` ``EngineReplica``s."""

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
                      max_ongoing_requests=int(cfg.app.get("max_queue", 64)))
    class EngineReplica:
        def __init__(self, cfg: ReplicaConfig):
            from mplus_deploy.runtime import Engine

            from .app import create_app, widen_thread_pool

            self.engine = Engine(cfg.artifact, **cfg.engine)
            self.app = create_app(self.engine, cfg.store, max_resident=max_resident, **cfg.app)
            self._widen, self._widened = widen_thread_pool, False
            import ray

            self.name = ray.get_runtime_context().get_actor_name() or "replica"

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def load(self, mid: str):
            return _Loaded(self.app.state.serve.store, mid)

        async def handle(self, req: dict):
            if not self._widened:  # the app's lifespan, which a direct ASGI call does not run
                self._widen(int(self.app.state.max_queue))
                self._widened = True
            mid = serve.get_multiplexed_model_id()
            if mid:
                await self.load(mid)
            first = True
            async for item in asgi_call(self.app, req):
                if first:
                    item["headers"].append(["x-mplus-replica", self.name])
                    first = False
                yield item

    gateway = FastAPI(title="mplus-serve (Ray Serve gateway)", docs_url=None, redoc_url=None)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(gateway)
    class Gateway:
        def __init__(self, replica):
            self.replica = replica

        @gateway.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def forward(self, path: str, request: Request):
            body = await request.body()
            req = {"method": request.method, "path": request.url.path, "query": request.url.query,
                   "headers": [[k, v] for k, v in request.headers.items() if k.lower() not in ("host",)],
                   "body": body}
            mid = memory_id(req["path"], body)
            gen = self.replica.options(stream=True, multiplexed_model_id=mid).handle.remote(req)
            head = await gen.__anext__()
            headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}

            async def body_chunks():
                async for chunk in gen:
                    yield chunk

            return StreamingResponse(body_chunks(), status_code=head["status"], headers=headers,
                                     media_type=headers.get("content-type"))

    return Gateway.bind(EngineReplica.bind(cfg))


def run(cfg: ReplicaConfig, replicas: int, host: str, port: int, max_resident: int, address: str | None,
        replica_cpus: float, blocking: bool = True):
    """Start (or join, ``address``) a Ray cluster, Serve's HTTP proxy on ``host:port``, and the application."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(cfg, replicas, max_resident, replica_cpus), name="mplus", route_prefix="/")
    if not blocking:
        return handle
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()  # the replicas drain; every acknowledged memorize is already in the store
    ray.shutdown()
    return None
