"""``mplus-serve``: an OpenAI-compatible HTTP server with a durable memory per user (docs/serving.md).

``create_app(engine, store_dir, ...)`` (``app.py``) builds the FastAPI app over an open ``runtime.Engine``;
``store.py`` is the durable memory store (SQLite index + one snapshot per memory), ``generation.py`` the
OpenAI routes, ``memory_api.py`` the memory routes. Imports ``runtime``, ``model`` and ``util``; nothing below
imports it (``cli/serve.py`` is the command)."""
from .app import create_app

__all__ = ["create_app"]
