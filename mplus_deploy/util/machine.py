"""Machine description and median timing shared by the benchmarks and the profiler."""
from __future__ import annotations

import platform
import statistics
import time


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, runs: int, warmup: int = 0) -> float:
    """Median wall seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (GiB): ``VmHWM`` of /proc/self/status, the high-water
    mark of this process's own address space. Not ``getrusage``'s ``ru_maxrss`` where /proc exists: Linux
    keeps that across ``execve``, so a child started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_bytes() -> int | None:
    """Current resident set size in bytes from /proc/self/statm (one short read: cheap enough per graph call);
    None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _page_size() -> int:
    import resource

    return resource.getpagesize()


_PAGE = _page_size()


def rss_gib() -> float:
    """Current resident set size (GiB; NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def stage_logger(log, prefix: str = ""):
    """``say(msg)``: ``log(prefix + msg + " [RSS x GiB, peak y GiB]")``, or nothing when ``log`` is None. One line
    per stage on stderr, so long work shows progress in logs and not only on a terminal."""
    if log is None:
        return lambda msg: None
    return lambda msg: log(f"{prefix}{msg} [RSS {rss_gib():.2f} GiB, peak {peak_rss_gib():.2f} GiB]")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``): large numpy/protobuf
    buffers freed between stages otherwise stay in the process's RSS (glibc raises its mmap threshold after
    such frees, so later ones come from a heap it does not shrink)."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc ``malloc_trim(0)`` alone (no garbage collection: cheap enough to call per work item, e.g. per text of
    the accuracy report, where freed arena and numpy blocks otherwise pile up as heap holes in the RSS)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
