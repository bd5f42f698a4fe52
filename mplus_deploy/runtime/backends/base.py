"""The runner interface every backend implements (Polygraphy style: activate / infer / deactivate).

A runner executes the graphs of docs/graphs.md by name (``memory_update``, ``memory_update_short``,
``memory_project``, ``retriever``, ``prefill``, ``decode``). Feeds are CPU torch tensors (or values a
previous ``infer`` returned for a name listed in ``keep``). Outputs come back as CPU torch tensors,
except those named in ``keep``: they stay backend-native (an ``OrtValue``, a CUDA buffer, ...) so a
KV cache never leaves the device between decode steps. The engine treats kept values as opaque.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

GRAPHS = ("memory_update", "memory_update_short", "memory_project", "retriever", "prefill", "decode", "decode_batch")


class BackendUnavailable(RuntimeError):
    """The requested backend / device cannot run here; the message says what to install or change."""


class Runner(ABC):
    name = "runner"

    def __init__(self):
        self.is_active = False

    # ------------------------------------------------------------------ life cycle
    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def infer(self, graph: str, feeds: dict, keep: tuple = ()) -> dict:
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active; call activate() (or use it as a context manager)")
        if graph not in self.graphs():
            raise KeyError(f"{self.name} runner has no graph {graph!r}; available: {sorted(self.graphs())}")
        return self.infer_impl(graph, feeds, keep)

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict: ...

    @abstractmethod
    def graphs(self) -> set: ...

    def place(self, feeds: dict) -> dict:
        """Backend-native copies of host tensors that many calls will read unchanged (the decode graph's memory
        prefix and first tail, ``kvcache.DecodeCache``): moved to the device once instead of at every call.
        Usable as feeds like the values ``keep`` returns. The default returns the feeds as they are."""
        return feeds

    def describe(self) -> dict:
        """Backend, device and provider facts for logs and bench reports."""
        return {"backend": self.name}

    # The decode loop's cache (``generate.token_stream``): prefill's ``present_k``/``present_v`` are asked for
    # with ``keep=prefill_keep`` and handed to ``start_decode``, which returns the object the loop feeds each
    # step from (``feeds()``, ``keep``, ``advance(out)``: ``kvcache.DecodeCache``'s interface). A backend with its
    # own cache layout (the torch runner's static device cache) overrides both.
    prefill_keep: tuple = ()

    def start_decode(self, out: dict, prefix_len: int):
        from mplus_deploy.runtime.kvcache import DecodeCache

        return DecodeCache(out["present_k"], out["present_v"], prefix_len, place=self.place)


class DelegatingRunner(Runner):
    """A runner around another one (``inner``): life cycle, graphs, ``describe`` and ``place`` are the inner
    runner's; subclasses override ``infer_impl`` to observe calls (``profiling.TimedRunner``,
    ``backends.recording.RecordingRunner``). Use with ``Engine(..., wrap=...)``."""

    def __init__(self, inner: Runner):
        super().__init__()
        self.inner, self.name = inner, inner.name
        self.is_active = inner.is_active

    def activate_impl(self) -> None:
        self.inner.activate()

    def deactivate_impl(self) -> None:
        self.inner.deactivate()

    def graphs(self) -> set:
        return self.inner.graphs()

    def describe(self) -> dict:
        return self.inner.describe()

    def place(self, feeds: dict) -> dict:
        return self.inner.place(feeds)

    @property
    def prefill_keep(self) -> tuple:
        return self.inner.prefill_keep

    def start_decode(self, out: dict, prefix_len: int):
        return self.inner.start_decode(out, prefix_len)

    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        return self.inner.infer(graph, feeds, keep)
