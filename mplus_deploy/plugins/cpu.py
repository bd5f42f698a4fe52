"""CPU fast path for top-k retrieval (spec R7): chunked over S, never materialises [T, S].

Each chunk computes ``q @ keys_c.T`` into a reused buffer, applies the sigmoid in place and reduces
over T at once, so only ``T x chunk`` floats are alive (a few MB, cache-resident) instead of the
1.3 GB [T, S] matrix of the naive path. The [S] score vector (S floats) is kept; selection then uses
the exact tie rule of the reference.
"""
from __future__ import annotations

import torch

from .reference import _check, exact_topk, order_oldest_first, small_ltm_indices

DEFAULT_CHUNK = 2048


def chunked_scores(q: torch.Tensor, keys: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """fp32 ``mean_T sigmoid(q @ keys.T)`` → [S], ``T x chunk`` floats alive at a time."""
    q = q.float().contiguous()
    T, S = q.shape[0], keys.shape[0]
    out = torch.empty(S, dtype=torch.float32, device=q.device)
    buf = torch.empty(T, min(chunk, S), dtype=torch.float32, device=q.device)
    for s0 in range(0, S, chunk):
        kc = keys[s0 : s0 + chunk]
        kc = kc if kc.dtype == torch.float32 else kc.float()
        b = buf[:, : kc.shape[0]]
        torch.mm(q, kc.T, out=b)
        torch.sigmoid_(b)
        torch.mean(b, 0, out=out[s0 : s0 + kc.shape[0]])
    return out


def topk_retrieve_chunked(
    q: torch.Tensor, keys: torch.Tensor, valid_len: int, ages: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Same contract and result as :func:`mplus_deploy.plugins.reference.topk_retrieve`."""
    valid_len = _check(q, keys, valid_len, ages, k)
    if valid_len < k:
        return small_ltm_indices(valid_len, k, ages, device=keys.device)
    scores = chunked_scores(q, keys[:valid_len], chunk)
    return order_oldest_first(exact_topk(scores, k), ages)


def naive_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The naive path (benchmark baseline only): the whole [T, S] matrix, then sigmoid and mean."""
    return torch.sigmoid(q.float() @ keys.float().T).mean(0)
