"""Reference semantics of the retrieval plugins (spec §6.1, §11.2, §11.3).

Thin wrappers over :mod:`mplus_deploy.model.retrieval` (the single source of truth); every other
implementation (chunked CPU, Triton, ONNX standard ops, ONNX custom op oracles) is tested against
:func:`topk_retrieve` here.
"""
from __future__ import annotations

import torch

from mplus_deploy.model import retrieval as R


def check_inputs(q: torch.Tensor, keys: torch.Tensor, valid_len: int, ages: torch.Tensor, k: int) -> int:
    valid_len = int(valid_len)
    if valid_len <= 0:
        raise ValueError(
            f"topk_retrieve: valid_len={valid_len}; the long-term memory is empty (spec §8), "
            "retrieval needs at least one row"
        )
    if valid_len > keys.shape[0]:
        raise ValueError(f"topk_retrieve: valid_len={valid_len} > number of key rows {keys.shape[0]}")
    if ages.shape[0] < valid_len:
        raise ValueError(f"topk_retrieve: {ages.shape[0]} ages for valid_len={valid_len}")
    if k <= 0:
        raise ValueError(f"topk_retrieve: k must be positive, got {k}")
    if q.shape[-1] != keys.shape[-1]:
        raise ValueError(f"topk_retrieve: q dim {q.shape[-1]} != keys dim {keys.shape[-1]}")
    return valid_len


def exact_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k with the ONNX tie rule (higher score first, then lower index), ascending, on any device.

    Uses ``torch.topk`` only for the k-th *value* (values are deterministic even where torch's tie
    order is not), then takes every entry above it plus the lowest-index entries equal to it.
    Equals :func:`mplus_deploy.model.retrieval.topk_indices` for NaN-free scores.
    """
    n = scores.numel()
    if k > n:
        raise ValueError(f"top-k of {k} from only {n} scores")
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > kth).flatten()
    equal = torch.nonzero(scores == kth).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def order_oldest_first(idx: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
    """Reorder ``idx`` (the selected rows, in list order) oldest first with the stable rule."""
    sel_ages = ages[idx.to(ages.device)]
    return idx[R.age_order(sel_ages, "stable").to(idx.device)]


def small_ltm_indices(valid_len: int, k: int, ages: torch.Tensor, device=None) -> torch.Tensor:
    """Small-LTM branch: cyclic fill, then oldest first (prompt-independent)."""
    idx = R.cyclic_indices(valid_len, k)
    if device is not None:
        idx = idx.to(device)
    return order_oldest_first(idx, ages)


def merged_rows(valid_len: int, merged_len) -> int:
    """The merged LTM rows (the small-LTM test and cyclic fill use them; rows ``merged_len..valid_len`` are
    pending, spec §6.1): ``merged_len`` when given, else all ``valid_len`` rows."""
    if merged_len is None:
        return valid_len
    m = int(torch.as_tensor(merged_len).reshape(-1)[0])
    if not 0 < m <= valid_len:
        raise ValueError(f"topk_retrieve: merged_len={m} must be in 1..valid_len={valid_len} (spec §8: an empty "
                         "merged LTM cannot be retrieved from)")
    return m


def topk_retrieve(q: torch.Tensor, keys: torch.Tensor, valid_len: int, ages: torch.Tensor, k: int,
                  merged_len=None) -> torch.Tensor:
    """int64 [k] indices into ``keys`` (rows ``< valid_len``) of the retrieved rows, oldest first.

    ``merged_len`` (default ``valid_len``): rows ``[0, merged_len)`` are the merged LTM, the rest up to
    ``valid_len`` pending rows (``retrieval.select``). ``merged_len >= k``: fp32 ``mean_T sigmoid(q @
    keys[:valid_len].T)``, top-k (ties: higher score, then lower index), ascending, then stable oldest-first
    by ``ages``. ``merged_len < k``: ``cyclic_indices(merged_len, k)`` (pending rows ignored, as the official
    code) then oldest first.
    """
    valid_len = check_inputs(q, keys, valid_len, ages, k)
    m = merged_rows(valid_len, merged_len)
    if m < k:
        return small_ltm_indices(m, k, ages, device=keys.device)
    scores = R.mean_sigmoid_scores(q, keys[:valid_len], "fp32")
    idx = R.topk_indices(scores, k)
    return order_oldest_first(idx, ages)


def memory_gather(pool: torch.Tensor, indices: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``pool.index_select(axis, indices)`` on the pool's device (pool may be pinned host memory); the
    prefill gathers axis 1 of the per-layer LTM K/V ``[Hkv, S, Dh]``."""
    return pool.index_select(axis, indices.to(pool.device, torch.int64))
