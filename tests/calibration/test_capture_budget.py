"""Calibration capture at paper scale: equal large feeds are stored once and a graph's reservoir shrinks to
its byte budget (``capture.CaptureRunner``, the runtime's ``RecordingRunner`` with a byte budget), so capturing a real-width prefill (234 MB of memory K/V per sample
and layer) does not hold 32 copies of the memory."""
from __future__ import annotations

import random

import numpy as np
import torch

from mplus_deploy.calibration import capture as C
from mplus_deploy.runtime.backends.base import Runner


class _Inner(Runner):
    name = "fake"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def graphs(self):
        return {"g"}

    def infer_impl(self, graph, feeds, keep):
        self.calls += 1
        return {"y": torch.as_tensor(feeds["x"]).sum()}


MANIFEST = {"graphs": {"g": {"inputs": [{"name": "prefix"}, {"name": "x"}]}}}


def _recorder(cap, max_bytes, with_prefix=True):
    man = MANIFEST if with_prefix else {"graphs": {"g": {"inputs": [{"name": "x"}]}}}
    rec = C.CaptureRunner(_Inner().activate(), man, cap, random.Random(0), None, max_bytes=max_bytes)
    return rec.samples.setdefault("g", []), rec


def test_equal_large_feeds_are_stored_once():
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((2, 1 << 17)).astype(np.float32)  # 1 MiB: shared by every step
    store, rec = _recorder(cap=8, max_bytes=1 << 40)
    for i in range(8):
        out = rec.infer("g", {"prefix": torch.from_numpy(prefix.copy()), "x": torch.randn(4)})
        assert torch.isfinite(out["y"])
    assert len(store) == 8 and rec.inner.calls == 8
    assert len({id(f["prefix"]) for f in store}) == 1  # one copy for all samples ...
    assert all(np.array_equal(f["prefix"], prefix) for f in store)  # ... equal to what was fed
    assert len({id(f["x"]) for f in store}) == 8  # small feeds are plain copies


def test_reservoir_shrinks_to_the_byte_budget():
    rng = np.random.default_rng(1)
    big = 4 << 20
    store, rec = _recorder(cap=32, max_bytes=6 * big, with_prefix=False)
    for i in range(40):
        rec.infer("g", {"x": torch.from_numpy(rng.standard_normal(big // 4).astype(np.float32))})
    assert len(store) == 6 and rec.caps["g"] == 6  # 6 samples of 4 MiB in a 24 MiB budget
    assert len(rec.pool.arrays) == 6  # replaced samples were released
    store, rec = _recorder(cap=32, max_bytes=big, with_prefix=False)  # never fewer than MIN_SAMPLES
    for i in range(10):
        rec.infer("g", {"x": torch.from_numpy(rng.standard_normal(big // 4).astype(np.float32))})
    assert len(store) == C.MIN_SAMPLES
    store, rec = _recorder(cap=3, max_bytes=1 << 40, with_prefix=False)  # and never more than asked
    for i in range(10):
        rec.infer("g", {"x": torch.randn(8)})
    assert len(store) == 3
