"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("mplus_time_to_first_token_seconds", "Request start to the first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mplus_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             ["endpoint"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("mplus_request_latency_seconds", "Request start to the last byte of the answer",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("mplus_requests", "Requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.tokens = Counter("mplus_generated_tokens", "Tokens generated", registry=r)
        self.queue = Gauge("mplus_queue_depth", "Requests admitted and not finished", registry=r)
        self.resident = Gauge("mplus_resident_memories", "Memory sessions held in RAM", registry=r)
        self.rows = Gauge("mplus_memory_rows", "Memory rows of each resident session (stm: filled slots, ltm: "
                          "rows of layer 0, pending: rows awaiting the next merge)", ["memory", "kind"], registry=r)

    def memory_rows(self, stats: dict) -> None:
        """Refresh the per-session gauges from the store's recorded stats of resident sessions (``{id: stats}``;
        labels of evicted ones go)."""
        self.rows.clear()
        for mid, m in stats.items():
            self.rows.labels(mid, "stm").set(m["stm_fill"] * m["stm_slots"])
            self.rows.labels(mid, "ltm").set((m["ltm_rows"] or [0])[0])
            self.rows.labels(mid, "pending").set(m["pending_rows"] or 0)
        self.resident.set(len(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
