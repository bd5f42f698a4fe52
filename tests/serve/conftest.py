"""Servers for the serve tests: in-process (uvicorn in a thread, for the API tests) and as a child process
(``python -m mplus_deploy.cli.serve``, for restarts and ``kill -9``). Loopback only, free ports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``create_app(engine, store, **opts)`` on uvicorn in a daemon thread."""

    def __init__(self, engine, store, **opts):
        import uvicorn

        from mplus_deploy.serve import create_app

        self.app = create_app(engine, store, **opts)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.serve.store.close()


@pytest.fixture
def live(serve_art, tmp_path):
    """A server on the tiny artifact (API key ``k``), with its own store; the engine beside it."""
    from mplus_deploy.runtime import Engine

    eng = Engine(serve_art, seed=0)
    srv = LiveServer(eng, tmp_path / "store", api_key="k", model_name="tiny")
    yield srv, eng
    srv.stop()
    eng.close()


def spawn(art: Path, store: Path, port: int, *extra) -> subprocess.Popen:
    """``mplus-serve`` as a child process, waited on until /health answers."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "mplus_deploy.cli.serve", str(art), "--port", str(port), "--store",
                          str(store), "--log-level", "warning", "--model-name", "tiny", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"mplus-serve exited {p.returncode}: {p.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("mplus-serve did not answer /health within 60 s")
