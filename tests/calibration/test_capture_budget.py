"""Calibration capture at paper scale: equal large feeds are stored once and a graph's reservoir shrinks to
its byte budget (``capture._Recorder``), so capturing a real-width prefill (234 MB of memory K/V per sample
and layer) does not hold 32 copies of the memory."""
from __future__ import annotations

import random

import numpy as np

from mplus_deploy.calibration import capture as C


class _Sess:
    def __init__(self):
        self.calls = 0

    def run(self, names, feeds):
        self.calls += 1
        return [feeds["x"].sum()]


def _recorder(cap, max_bytes):
    store = []
    return store, C._Recorder(_Sess(), store, cap, random.Random(0), None, [0], max_bytes=max_bytes)


def test_equal_large_feeds_are_stored_once():
    rng = np.random.default_rng(0)
    prefix = rng.standard_normal((2, 1 << 17)).astype(np.float32)  # 1 MiB: shared by every step
    store, rec = _recorder(cap=8, max_bytes=1 << 40)
    for i in range(8):
        out = rec.run(["y"], {"prefix": prefix.copy(), "x": rng.standard_normal(4).astype(np.float32)})
        assert np.isfinite(out[0])
    assert len(store) == 8 and rec.sess.calls == 8
    assert len({id(f["prefix"]) for f in store}) == 1  # one copy for all samples ...
    assert all(np.array_equal(f["prefix"], prefix) for f in store)  # ... equal to what was fed
    assert len({id(f["x"]) for f in store}) == 8  # small feeds are plain copies


def test_reservoir_shrinks_to_the_byte_budget():
    rng = np.random.default_rng(1)
    big = 4 << 20
    store, rec = _recorder(cap=32, max_bytes=6 * big)
    for i in range(40):
        rec.run(["y"], {"x": rng.standard_normal(big // 4).astype(np.float32)})
    assert len(store) == 6 and rec.cap == 6  # 6 samples of 4 MiB in a 24 MiB budget
    assert len(rec.pool.arrays) == 6  # replaced samples were released
    store, rec = _recorder(cap=32, max_bytes=big)  # never fewer than MIN_SAMPLES
    for i in range(10):
        rec.run(["y"], {"x": rng.standard_normal(big // 4).astype(np.float32)})
    assert len(store) == C.MIN_SAMPLES
    store, rec = _recorder(cap=3, max_bytes=1 << 40)  # and never more than asked
    for i in range(10):
        rec.run(["y"], {"x": rng.standard_normal(8).astype(np.float32)})
    assert len(store) == 3
