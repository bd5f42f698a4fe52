"""``RecordingRunner``: a runner wrapper that keeps a reservoir sample of the feeds of every graph call.

Used by the quantization accuracy report: the fp32 engine runs held-out text through the runtime (the
path users run), this wrapper keeps up to ``per_graph`` feed sets per graph, and the report then replays
exactly those feeds on the fp32 and the quantized runner to measure per-graph errors. Backend-native
values (an ``OrtValue`` decode tail) are stored as CPU tensors, so a sample can be replayed on any runner.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .base import DelegatingRunner, Runner


def _host(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if hasattr(v, "numpy"):  # OrtValue and friends
        return torch.from_numpy(np.array(v.numpy()))
    return torch.as_tensor(np.asarray(v)).clone()


class RecordingRunner(DelegatingRunner):
    """Delegates everything to ``inner``; ``samples[graph]`` holds up to ``per_graph`` feed dicts of that graph
    (reservoir sampling with ``seed``: every call equally likely to be kept, whatever the order)."""

    def __init__(self, inner: Runner, per_graph: int = 8, seed: int = 0, graphs=None):
        super().__init__(inner)
        if per_graph < 0:
            raise ValueError(f"per_graph must be >= 0, got {per_graph}")
        self.per_graph, self.rng = int(per_graph), random.Random(seed)
        self.only = set(graphs) if graphs is not None else None
        self.samples: dict[str, list[dict]] = {}
        self.calls: dict[str, int] = {}

    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        if self.only is None or graph in self.only:
            n = self.calls[graph] = self.calls.get(graph, 0) + 1
            store = self.samples.setdefault(graph, [])
            item = self.prepare(graph, feeds)
            cap = self.capacity(graph, item, n)
            slot = len(store) if len(store) < cap else self.rng.randrange(n)
            if slot < cap:
                rec = self.stored(graph, item)
                if slot == len(store):
                    store.append(rec)
                else:
                    store[slot] = rec
                    self.replaced(graph)
        return self.inner.infer(graph, feeds, keep)

    # ------------------------------------------------------------------ hooks (calibration.capture.CaptureRunner)
    def prepare(self, graph: str, feeds: dict):
        """Every call's feeds in the form the hooks below take (here: as they are, nothing copied)."""
        return feeds

    def capacity(self, graph: str, item, n: int) -> int:
        """How many samples of ``graph`` the reservoir keeps (``n``: this call's number)."""
        return self.per_graph

    def stored(self, graph: str, item) -> dict:
        """The kept sample: host copies of the feeds."""
        return {k: _host(v) for k, v in item.items()}

    def replaced(self, graph: str) -> None:
        """Called after a kept sample replaced an older one."""
