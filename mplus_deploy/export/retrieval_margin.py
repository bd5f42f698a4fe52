"""Validation inputs whose retrieval is not decided by rounding: a clear score gap at every layer's top-K0 cut.

The prefill graph's retrieved rows are compared with the reference's exactly, and one flipped row changes that
layer's prefix, every later layer's input and so their retrievals (408 of 30 x 128 indices on the demo with a
trained retriever). On random validation memories the K0-th and (K0+1)-th mean-sigmoid scores were 1e-8 to 1e-15
apart with a trained retriever (its scores for rows unrelated to the prompt crowd near 0) and ~1e-7 with the
untrained one: below the fp32 differences of another summation order (another CPU's kernels), so validation
tested rounding luck (the demo's export failed on an AMD EPYC).

``separate`` makes the cut clear without changing which rows are selected: layer by layer, in the order the
prefill reads them (layer l's input depends on the rows layers < l retrieved), it adds to the keys of the K0 rows
that layer selects one vector ``w`` with ``q_t . w = alpha`` for every prompt query ``q_t`` (the least-norm
solution), so each selected row's logit against every query rises by ``alpha`` and the ranking inside and outside
the set is unchanged; ``alpha`` doubles until the gap is at least ``TIE_MARGIN``. The memory stays a valid input:
keys are graph inputs, and the reference and the graph both read the changed ones.
"""
from __future__ import annotations

import torch

from mplus_deploy.model import forward as F_
from mplus_deploy.model import retrieval
from mplus_deploy.model.forward import retriever_query

TIE_MARGIN = 1e-4  # mean-sigmoid score gap at the cut: ~1000x the fp32 summation-order differences seen
MAX_DOUBLINGS = 16


def _layer_keys(mem, l: int) -> torch.Tensor:
    return mem.ltm_keys[l] if mem.pend_keys is None else torch.cat([mem.ltm_keys[l], mem.pend_keys[l].to(mem.ltm_keys[l].dtype)])


def _gap(q: torch.Tensor, keys: torch.Tensor, K0: int, mode: str) -> tuple[float, torch.Tensor]:
    s = retrieval.mean_sigmoid_scores(q, keys, mode)
    top = torch.topk(s, K0).indices
    srt = torch.sort(s, descending=True).values
    return float(srt[K0 - 1] - srt[K0]), top


def _raise_rows(mem, l: int, rows: torch.Tensor, w: torch.Tensor) -> None:
    n_m = mem.ltm_keys[l].shape[0]
    m, p = rows[rows < n_m], rows[rows >= n_m] - n_m
    mem.ltm_keys[l][m] = (mem.ltm_keys[l][m].float() + w).to(mem.ltm_keys[l].dtype)
    if p.numel():
        mem.pend_keys[l, p] = (mem.pend_keys[l, p].float() + w).to(mem.pend_keys.dtype)


@torch.no_grad()
def separate(model, mem, ids: torch.Tensor, margin: float = TIE_MARGIN) -> list[float]:
    """Widen every layer's top-K0 score gap of ``mem`` for prompt ``ids`` to >= ``margin`` in place (module
    docstring); → the gaps after. Layers on the cyclic small-LTM branch (merged < K0) have no cut and are skipped."""
    cfg, mode = model.config, model.score_mode()
    K0, gaps = cfg.K0, []
    if mem.pend_keys is not None:
        mem.pend_keys = mem.pend_keys.clone()

    def observe(l, h):
        if mem.ltm_keys[l].shape[0] < K0:
            return
        keys = _layer_keys(mem, l)
        if keys.shape[0] <= K0:
            return
        q = retriever_query(model, l, h, mode).float()
        gap, top = _gap(q, keys, K0, mode)
        if gap < margin:
            base = torch.linalg.pinv(q) @ torch.ones(q.shape[0], dtype=q.dtype)  # q_t . base = 1 for every t
            alpha = 1.0
            for _ in range(MAX_DOUBLINGS):
                _raise_rows(mem, l, top, alpha * base)
                gap, top2 = _gap(q, _layer_keys(mem, l), K0, mode)
                if not torch.equal(torch.sort(top2).values, torch.sort(top).values):
                    raise RuntimeError(f"layer {l}: separating the retrieval cut changed the selected rows")
                if gap >= margin:
                    break
                alpha *= 2.0  # the next pass adds 2x this one (the total doubles... and then some)
        gaps.append(gap)

    F_.prefill(model, mem, ids, observe=observe)
    mem.touch()
    return gaps
