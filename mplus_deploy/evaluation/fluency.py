"""Degenerate repetition in generated text: the failure a memory that drifts produces ("they they they ...",
"pectivespectives...") and the check that a long-memorized demo still speaks (issue 20).

``repetition_rate(ids, n)``: the share of the n-grams of a token sequence that repeat an earlier n-gram of the
same sequence (``1 - distinct / total``; rep-n of Welleck et al., "Neural text generation with unlikelihood
training", 2019). 0 for text with no repeated n-gram; → 1 for a loop of one token. Ordinary English prose of
a few dozen tokens has rep-3 near 0; a greedy loop of a short phrase approaches 1.
"""
from __future__ import annotations


def repetition_rate(ids, n: int = 3) -> float:
    ids = [int(t) for t in ids]
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        raise ValueError(f"repetition_rate needs at least n={n} tokens, got {len(ids)}")
    return 1.0 - len(set(grams)) / len(grams)
