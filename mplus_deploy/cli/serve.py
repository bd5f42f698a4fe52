"""``mplus-serve OUT [--host 127.0.0.1] [--port 8000] [--backend ...] [--quantized MODE] [--store DIR] [--api-key KEY]``

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

    def parse(self, a) -> None:
        if not 0 < a.port < 65536:
            raise UsageError(f"--port {a.port}: must be 1..65535")
        for flag, v in (("--max-resident", a.max_resident), ("--max-queue", a.max_queue), ("--max-batch", a.max_batch or 1)):
            if v < 1:
                raise UsageError(f"{flag} {v}: must be >= 1")
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


if __name__ == "__main__":
    sys.exit(main())
