"""Registry of graph families: wrapper, spec, export example and validation cases with their
reference outputs (computed by ``mplus_deploy.model``, never by the wrapper)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import decode, decode_batch, memory_project, memory_update, prefill, retriever
from .common import GraphSpec, Limits


@dataclass
class Family:
    name: str
    build: Callable  # model -> nn.Module
    spec: Callable  # (cfg, limits) -> GraphSpec
    cases: Callable  # (model, limits, seed) -> iterator of (feeds, reference thunk), made one at a time


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _mu_cases(short):
    def cases(model, limits, seed):
        g, cfg = _gen(seed), model.config
        for T in memory_update.validation_shapes(cfg, limits, short):
            f = memory_update.sample(cfg, g, T, model.dtype)
            yield f, lambda f=f: memory_update.reference(model, f)
    return cases


def _mp_cases(model, limits, seed):
    g, cfg = _gen(seed), model.config
    for n in [cfg.K] + [n for n in memory_project.validation_shapes(cfg, limits) if n != cfg.K]:
        f = memory_project.sample(cfg, g, n, model.dtype)
        yield f, lambda f=f: memory_project.reference(model, f)


def _rt_cases(model, limits, seed):
    g, cfg = _gen(seed), model.config
    for case in retriever.validation_cases(cfg, limits):
        f = retriever.sample(cfg, g, case, model.dtype)
        yield f, lambda f=f: retriever.reference(model, f)


def _pf_cases(model, limits, seed):
    g, cfg = _gen(seed), model.config
    for case in prefill.validation_cases(cfg, limits):
        f, mem = prefill.sample(model, g, case)
        yield f, lambda f=f, mem=mem: prefill.reference(model, f, mem)


def _dc_cases(model, limits, seed):
    g, cfg = _gen(seed), model.config
    for C in decode.validation_shapes(cfg, limits):
        f = decode.sample(cfg, g, C, model.dtype)
        yield f, lambda f=f: decode.reference(model, f)


def _db_cases(model, limits, seed):
    g, cfg = _gen(seed), model.config
    for B, C in decode_batch.validation_shapes(cfg, limits):
        f = decode_batch.sample(cfg, g, B, C, model.dtype)
        yield f, lambda f=f: decode_batch.reference(model, f)


def families(cfg) -> list[Family]:
    fams = [
        Family(memory_update.NAME, lambda m: memory_update.MemoryUpdate(m, short=False),
               lambda c, lim: memory_update.spec(c, lim, short=False), _mu_cases(False)),
    ]
    if cfg.K > 1:
        fams.append(Family(memory_update.NAME_SHORT, lambda m: memory_update.MemoryUpdate(m, short=True),
                           lambda c, lim: memory_update.spec(c, lim, short=True), _mu_cases(True)))
    fams.append(Family(memory_project.NAME, memory_project.MemoryProject, memory_project.spec, _mp_cases))
    if cfg.is_mplus:
        fams.append(Family(retriever.NAME, retriever.Retriever, retriever.spec, _rt_cases))
    fams += [Family(prefill.NAME, prefill.Prefill, prefill.spec, _pf_cases),
             Family(decode.NAME, decode.Decode, decode.spec, _dc_cases),
             Family(decode_batch.NAME, decode_batch.DecodeBatch, decode_batch.spec, _db_cases)]
    return fams


def export_args(spec: GraphSpec, feeds: dict) -> tuple:
    return tuple(feeds[i.name] for i in spec.inputs)


def trace_size(lo: int, hi: int) -> int:
    """Size of a dynamic dim in the trace example: a little above its minimum (never 1: a dim traced at
    size 1 is fragile), small so tracing a real-width graph costs little."""
    return min(hi, lo + 3)


def trace_feeds(spec: GraphSpec, cfg, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random example inputs of ``spec``'s shapes for tracing (values only need to be in range)."""
    g = _gen(seed)
    size = {k: trace_size(v[0], v[2]) for k, v in spec.dims.items()}
    S, P = size.get("S", 0), cfg.prefix_len

    def dim(d):
        if isinstance(d, int):
            return d
        if d in size:
            return size[d]
        if d == "C+1":
            return size["C"] + 1
        raise KeyError(f"{spec.name}: no trace size for dim {d!r}")

    out = {}
    for io in spec.inputs:
        shape = [dim(d) for d in io.shape]
        if io.dtype != "int64":
            out[io.name] = torch.randn(shape, generator=g).to(dtype)
        elif io.name == "ids":
            out[io.name] = torch.randint(0, cfg.vocab_size, shape, generator=g)
        elif io.name in ("valid_len", "merged_len"):
            out[io.name] = torch.full(shape, S, dtype=torch.int64)
        elif io.name == "pos":
            out[io.name] = torch.tensor(P + size["C"], dtype=torch.int64)
        elif io.name == "logit_rows":
            out[io.name] = torch.arange(shape[0], dtype=torch.int64) % size["T"]
        elif io.name == "ltm_ages":
            out[io.name] = torch.randint(0, 3 * cfg.K, shape, generator=g)
        else:  # layer
            out[io.name] = torch.zeros(shape, dtype=torch.int64)
    return out
