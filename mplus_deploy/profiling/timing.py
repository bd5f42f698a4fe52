"""Timing primitives: percentile stats, a timing wrapper around any runner, RSS and copy bandwidth.

``TimedRunner`` wraps a backend runner (it is itself a ``Runner``): every ``infer`` is recorded as
``(graph, start, seconds[, gpu_seconds])``. The engine calls its runner by graph name only, so wrapping
the runner object times every stage the engine drives (memory_update, memory_project, prefill, decode)
without touching the engine's code. On CUDA the wrapper synchronizes after each call (wall time is
then the device time plus launch overhead) and, for the torch backend, also records CUDA events.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from mplus_deploy.runtime.backends.base import DelegatingRunner, Runner
from mplus_deploy.util.machine import peak_rss_gib


# ---------------------------------------------------------------------------------- stats
def stats_ms(seconds) -> dict:
    """n, mean, min, p50, p90, p99, max in milliseconds (linear-interpolated percentiles)."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(a.max())}


# ---------------------------------------------------------------------------------- runner wrapper
@dataclass
class Call:
    graph: str
    start: float  # perf_counter at entry
    seconds: float  # wall (synchronized on CUDA)
    gpu_seconds: float | None = None  # CUDA events (torch backend on cuda)


class TimedRunner(DelegatingRunner):
    """Records every ``infer`` of ``inner``; everything else is delegated."""

    def __init__(self, inner: Runner, device: str = "cpu"):
        super().__init__(inner)
        self.calls: list[Call] = []
        self.cuda = device == "cuda"

    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        ev = None
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            if self.name == "torch":
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
        t0 = time.perf_counter()
        out = self.inner.infer(graph, feeds, keep)
        gpu = None
        if self.cuda:
            import torch

            if ev is not None:
                ev[1].record()
            torch.cuda.synchronize()
            if ev is not None:
                gpu = ev[0].elapsed_time(ev[1]) / 1e3
        self.calls.append(Call(graph, t0, time.perf_counter() - t0, gpu))
        return out

    # ------------------------------------------------------------------ reading the record
    def mark(self) -> int:
        return len(self.calls)

    def since(self, mark: int, graph: str | None = None) -> list[Call]:
        return [c for c in self.calls[mark:] if graph is None or c.graph == graph]

    def total(self, mark: int, graph: str | None = None) -> float:
        return sum(c.seconds for c in self.since(mark, graph))

    def clear(self) -> None:
        self.calls.clear()


# ---------------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB; the rule is ``util.machine.peak_rss_gib``'s)."""
    if sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return peak_rss_gib() * 1024


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def available_ram_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_memory() -> dict | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"device": torch.cuda.get_device_name(), "max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20, "used_mb": (total - free) / 2**20,
            "total_mb": total / 2**20}


# ---------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5, device: str = "cpu") -> dict:
    """The machine's memory bandwidth, best of ``repeat``: a large copy (bytes read + written, as STREAM
    counts it) and a large read (sum). Decode is bandwidth-bound, so its achieved GB/s is compared with
    the read figure. torch ops use all intra-op threads; numpy's copy is single-threaded."""
    import torch

    n = nbytes // 4
    out = {"bytes": int(nbytes), "device": device}
    if device == "cuda":
        src = torch.ones(n, device="cuda")
        dst = torch.empty_like(src)
        copy_t, read_t = [], []
        for _ in range(repeat + 1):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(), dst.copy_(src), e.record(), torch.cuda.synchronize()
            copy_t.append(s.elapsed_time(e) / 1e3)
            s.record(), src.sum(), e.record(), torch.cuda.synchronize()
            read_t.append(s.elapsed_time(e) / 1e3)
        out.update(copy_gbps=2 * nbytes / min(copy_t[1:]) / 1e9, read_gbps=nbytes / min(read_t[1:]) / 1e9)
        return out
    src = torch.ones(n)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best_copy = best_read = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        best_read = min(best_read, time.perf_counter() - t0)
    a = src.numpy()
    b = np.empty_like(a)
    np.copyto(b, a)
    best_np = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best_np = min(best_np, time.perf_counter() - t0)
    out.update(copy_gbps=2 * nbytes / best_copy / 1e9, read_gbps=nbytes / best_read / 1e9,
               numpy_copy_gbps=2 * nbytes / best_np / 1e9, threads=torch.get_num_threads())
    return out
