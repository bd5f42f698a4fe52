"""How host feeds map onto graph inputs (docs/graphs.md, artifact format v3): the one owner of that rule,
used by every runner and by the exporter's validation.

The runtime keeps memory stacked by layer (``HostMemory.prefill_feeds``: ``ltm_k`` [L, Hkv, S, Dh], ...).
A graph input named ``{name}.{l}`` is layer ``l`` of the stacked feed ``name`` (a view: no copy; the
``prefill`` graph takes its LTM this way so that it never gathers a whole layer out of the stack). The
``prefill`` input ``logit_rows`` (which prompt rows get logits) defaults to every row; generation asks
for the last one only (1 row of [T, V] fp32 instead of 1 GiB at T = 2,048 with a 128k vocabulary).
"""
from __future__ import annotations

import re

import torch

LAYERED = ("ltm_keys", "ltm_k", "ltm_v")  # prefill inputs given per layer
_LAYER = re.compile(r"^(?P<name>.+)\.(?P<l>\d+)$")


def layered_names(L: int) -> list[str]:
    """The per-layer LTM inputs of ``prefill`` in graph order: ``ltm_keys.0, ltm_k.0, ltm_v.0, ltm_keys.1, ...``."""
    return [f"{n}.{l}" for l in range(L) for n in LAYERED]


def all_rows(ids) -> torch.Tensor:
    return torch.arange(int(ids.shape[0]), dtype=torch.int64)


def last_row(ids) -> torch.Tensor:
    return torch.tensor([int(ids.shape[0]) - 1], dtype=torch.int64)


def resolve(feeds: dict, name: str):
    """The value of graph input ``name`` from host ``feeds``; KeyError naming what is missing."""
    if name in feeds:
        return feeds[name]
    if name == "logit_rows" and "ids" in feeds:
        return all_rows(feeds["ids"])
    m = _LAYER.match(name)
    if m and m.group("name") in LAYERED and m.group("name") in feeds:
        return feeds[m.group("name")][int(m.group("l"))]
    raise KeyError(f"graph input {name!r} is not in the feeds ({sorted(feeds)})")
