"""``mplus-serve OUT [--host 127.0.0.1] [--port 8000] [--backend ...] [--quantized MODE] [--store DIR] [--api-key KEY]
[--ray --replicas N [--ray-address ADDR]]``

An OpenAI-compatible server with a durable memory per user (docs/serving.md): FastAPI on uvicorn. Argument
groups (``cli/args.py``): the shared ``ArtifactArgs`` and ``BackendArgs``, and ``ServeArgs``. Everything is
checked (and the store opened) before the port is bound; exit codes 0 (stopped), 2 usage or input error.
The API key may also come from ``MPLUS_API_KEY``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .args import INPUT_ERRORS, ArgGroup, ArtifactArgs, BackendArgs, UsageError, build_parser, parse_groups, report_error

API_KEY_ENV = "MPLUS_API_KEY"


class ServeArgs(ArgGroup):
    def add(self, p) -> None:
        g = p.add_argument_group("server")
        g.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
        g.add_argument("--port", type=int, default=8000)
        g.add_argument("--store", default="mplus-memories", metavar="DIR",
                       help="memory store: SQLite index + one snapshot per memory (default ./mplus-memories)")
        g.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
        g.add_argument("--model-name", default=None, help="the model id of /v1/models (default: the artifact's name)")
        g.add_argument("--max-resident", type=int, default=8, metavar="N", help="memories kept in RAM (LRU; default 8)")
        g.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="generation / memory requests in the server at once; more are answered 429 (default 64)")
        g.add_argument("--max-body-mb", type=float, default=64.0, metavar="MB", help="largest request body (default 64)")
        g.add_argument("--seed", type=int, default=0, help="drop-generator seed of every new memory (default 0)")
        g.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="decode steps of up to N concurrent generations run as one batched call (continuous "
                            "batching, runtime.batch; 1: off; at most the artifact's limits.max_batch). Default: 8 "
                            "(or the artifact's limit if lower) for fp32 graphs on onnxruntime/tensorrt; 1 for "
                            "--quantized graph sets (no quantized decode_batch yet) and the torch backend")
        g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
        r = p.add_argument_group("Ray Serve (serve.ray_app; pip install 'mplus-deploy[ray]')")
        r.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: --replicas Engines behind one gateway, requests routed by memory id")
        r.add_argument("--replicas", type=int, default=2, metavar="N", help="Engine replicas with --ray (default 2)")
        r.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (default: start a local one); the store must be on a filesystem "
                            "every node shares, with flock")
        r.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                       help="CPUs Ray reserves per replica (default 1)")

    def parse(self, a) -> None:
        if not 0 < a.port < 65536:
            raise UsageError(f"--port {a.port}: must be 1..65535")
        for flag, v in (("--max-resident", a.max_resident), ("--max-queue", a.max_queue), ("--max-batch", a.max_batch or 1)):
            if v < 1:
                raise UsageError(f"{flag} {v}: must be >= 1")
        if a.ray:
            if a.replicas < 1:
                raise UsageError(f"--replicas {a.replicas}: must be >= 1")
            if not a.replica_cpus >= 0:
                raise UsageError(f"--replica-cpus {a.replica_cpus}: must be >= 0")
            try:
                import ray.serve  # noqa: F401
            except ImportError as e:
                raise UsageError(f"--ray needs Ray Serve: pip install 'mplus-deploy[ray]' ({e})") from None
        if not a.max_body_mb > 0:
            raise UsageError(f"--max-body-mb {a.max_body_mb}: must be > 0")
        store = Path(a.store)
        if store.exists() and not store.is_dir():
            raise UsageError(f"--store {store}: exists and is not a directory")
        self.api_key = a.api_key or os.environ.get(API_KEY_ENV) or None
        self.store, self.a = store, a


DEFAULT_MAX_BATCH = 8


def default_max_batch(art, backend: str) -> int:
    """``--max-batch`` when not given: batching where it is exact and faster (fp32 graphs on a graph backend)."""
    if art.quantized or backend == "torch":
        return 1
    from mplus_deploy.artifact.source import open_source

    src = open_source(art.path)
    if not src.has_graphs:
        return 1
    return max(1, min(DEFAULT_MAX_BATCH, int((src.manifest.get("limits") or {}).get("max_batch", 1))))


def main(argv=None) -> int:
    art, backend, serve = groups = [ArtifactArgs(), BackendArgs(), ServeArgs()]
    p = build_parser("mplus-serve", "Serve an M+ artifact over an OpenAI-compatible HTTP API with a durable memory "
                     "per user (docs/serving.md).", groups)
    a = p.parse_args(argv)
    try:
        parse_groups(groups, a)
        if a.ray:
            return _serve_ray(art, backend, serve, a)
        eng = art.build(backend, seed=None, max_batch=a.max_batch or default_max_batch(art, a.backend))
        from mplus_deploy.serve import create_app

        app = create_app(eng, serve.store, api_key=serve.api_key, model_name=a.model_name,
                         max_resident=a.max_resident, max_queue=a.max_queue, max_body=int(a.max_body_mb * (1 << 20)),
                         seed=a.seed)
    except (*INPUT_ERRORS, OSError) as e:
        return report_error("mplus-serve", e, a.path)
    import uvicorn

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    st = app.state.serve
    print(f"mplus-serve: {st.model_name} on http://{a.host}:{a.port} (store {serve.store.resolve()}, "
          f"{len(st.store.ids())} memories; {'API key required' if serve.api_key else 'no API key'})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0


def _serve_ray(art, backend, serve, a) -> int:
    """``--ray``: the artifact is checked here (manifest and hashes), each replica opens its own Engine."""
    from mplus_deploy.artifact.source import open_source
    from mplus_deploy.serve.ray_app import ReplicaConfig, run

    if not open_source(art.path).has_graphs and a.backend != "torch":
        raise UsageError(f"{art.path}: --ray serves an exported artifact (mplus-export first) or --backend torch")
    opts = art.engine_options(backend, seed=None, max_batch=a.max_batch or default_max_batch(art, a.backend))
    cfg = ReplicaConfig(str(art.path), str(serve.store), engine=opts,
                        app={"api_key": serve.api_key, "model_name": a.model_name, "max_queue": a.max_queue,
                             "max_body": int(a.max_body_mb * (1 << 20)), "seed": a.seed})
    print(f"mplus-serve --ray: {a.replicas} replicas of {art.path} on http://{a.host}:{a.port} (store "
          f"{serve.store.resolve()}; {'API key required' if serve.api_key else 'no API key'})", file=sys.stderr, flush=True)
    run(cfg, a.replicas, a.host, a.port, a.max_resident, a.ray_address, a.replica_cpus, blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
