"""Graph I/O names and how host feeds map onto graph inputs (docs/graphs.md, artifact format v3): the one
owner of those rules, used by the exporter (which names the graphs' inputs), every runner and validation.

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


# ------------------------------------------------------------------ decode cache (format v2 onwards)
# ``prefill`` returns the post-RoPE cache stacked, ``present_k``/``present_v`` [L, Hkv, P+T, Dh]; ``decode`` takes
# it per layer in two parts: the memory prefix ``prefix_k.{l}``/``prefix_v.{l}`` [Hkv, P, Dh] (read-only) and the
# tail ``past_k.{l}``/``past_v.{l}`` [Hkv, C, Dh], returned grown by one row as ``present_k.{l}``/``present_v.{l}``.
PREFIX = ("prefix_k", "prefix_v")
PAST = ("past_k", "past_v")
PRESENT = ("present_k", "present_v")


def decode_output_names(L: int) -> list[str]:
    """Cache outputs of ``decode`` in graph order (after ``logits``): ``present_k.0, present_v.0, present_k.1, ...``."""
    return [f"{kind}.{l}" for l in range(L) for kind in PRESENT]


# ------------------------------------------------------------------ TensorRT optimization profiles
def profile_shapes(info: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """``{input: (min, opt, max)}`` of every input of a manifest graph entry, from its symbolic shapes and the
    entry's ``dynamic_dims`` ranges (a static input has min = opt = max)."""
    dims = info.get("dynamic_dims") or {}

    def value(d, which: str) -> int:
        if isinstance(d, int):
            return d
        if d not in dims:
            raise ValueError(f"dynamic dim {d!r} has no range in the manifest")
        return int(dims[d][which])

    return {io["name"]: tuple(tuple(value(d, w) for d in io["shape"]) for w in ("min", "opt", "max"))
            for io in info.get("inputs", [])}
