"""Latency profiling (issue 8): per-stage timings, tokens/s, peak memory and achieved memory bandwidth of an
exported artifact through ``Engine``; ``mplus-profile`` is the CLI (docs/profiling.md)."""
from .profiler import Settings, fill_ltm, profile
from .timing import TimedRunner, measure_bandwidth, stats_ms

__all__ = ["profile", "Settings", "fill_ltm", "TimedRunner", "measure_bandwidth", "stats_ms"]
