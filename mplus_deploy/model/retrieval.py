"""LTM retrieval semantics (spec §6, §11.2, §11.3): scores, top-K0 with deterministic ties,
cyclic fill for a small LTM, oldest-first age ordering.

These are the single source of truth: the plugins' ``topk_retrieve`` reference, the exported
retriever graph and the runtime all test against them.
"""
from __future__ import annotations

import numpy as np
import torch

SCORE_CHUNK = 16384  # columns of the [T, S] score matrix alive at a time (R7: never the whole matrix)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def mean_sigmoid_scores(q: torch.Tensor, keys: torch.Tensor, mode: str = "fp32", chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """``mean_T sigmoid(q @ keys.T)`` → fp32 [S], computed in column chunks.

    mode "fp32": fp32 math. "bf16": fp32 math rounded to bf16 after each op the official code runs in
    bf16 (product, sigmoid, mean). "native": compute in ``q.dtype`` (a bf16 model's own arithmetic).
    """
    S = keys.shape[0]
    out = torch.empty(S, dtype=torch.float32, device=q.device)
    for s0 in range(0, S, chunk):
        kc = keys[s0 : s0 + chunk]
        if mode == "fp32":
            out[s0 : s0 + chunk] = torch.sigmoid(q.float() @ kc.float().T).mean(0)
        elif mode == "bf16":
            qk = _bf16(_bf16(q.float()) @ _bf16(kc.float()).T)
            out[s0 : s0 + chunk] = _bf16(_bf16(torch.sigmoid(qk)).mean(0))
        elif mode == "native":
            out[s0 : s0 + chunk] = torch.sigmoid(q @ kc.to(q.dtype).T).mean(0).float()
        else:
            raise ValueError(f"score mode must be 'fp32', 'bf16' or 'native', got {mode!r}")
    return out


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k set with the ONNX tie rule (higher score first, then lower index), returned ascending."""
    if k > scores.numel():
        raise ValueError(f"top-k of {k} from only {scores.numel()} scores")
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def boundary_ties(scores: torch.Tensor, k: int) -> int:
    """How many entries share the k-th score (reported with every retrieved-set comparison, §11.2)."""
    kth = torch.sort(scores, descending=True, stable=True).values[k - 1]
    return int((scores == kth).sum())


def cyclic_indices(S_m: int, k: int) -> torch.Tensor:
    """Small-LTM branch (spec §6.1 step 2): arange(S_m) tiled until ≥ k long, last k kept."""
    if S_m <= 0:
        raise ValueError(
            "the long-term memory of this layer is empty: retrieval needs at least one LTM row "
            "(the official code loops forever here, spec §8); memorize text or load a checkpoint with an LTM"
        )
    reps = -(-k // S_m)
    return torch.arange(S_m, dtype=torch.int64).repeat(reps)[-k:]


def age_order(ages: torch.Tensor, mode: str = "stable", numpy_dtype: str = "float64") -> torch.Tensor:
    """Permutation putting the selected rows oldest first (spec §11.3).

    "stable": ``argsort(ages, stable)[::-1]``: age descending, ties by descending input index.
    "numpy": ``np.argsort(ages.astype(numpy_dtype))[::-1]`` with numpy's default (unstable) kind, to
    replay an official run on the same CPU and numpy build.
    """
    if mode == "stable":
        o = torch.sort(ages.to(torch.float64), stable=True).indices
        return o.flip(0)
    if mode == "numpy":
        a = ages.detach().cpu().numpy().astype(numpy_dtype)
        return torch.from_numpy(np.ascontiguousarray(np.argsort(a)[::-1])).to(torch.int64)
    raise ValueError(f"ltm_age_order must be 'stable' or 'numpy', got {mode!r}")


def select(
    q: torch.Tensor | None,
    merged_keys: torch.Tensor,
    pending_keys: torch.Tensor | None,
    merged_ages: torch.Tensor,
    pending_ages: torch.Tensor | None,
    k: int,
    score_mode: str = "fp32",
    order_mode: str = "stable",
    merged_age_dtype: str = "float64",
) -> torch.Tensor:
    """Indices into ``concat(merged, pending)`` of the K0 rows of one layer, in prefix order.

    ``q`` [T, d_r] is the projected query (unused in the small-LTM branch, which is prompt-independent).
    """
    S_m = merged_keys.shape[0]
    n_p = 0 if pending_keys is None else pending_keys.shape[0]
    if S_m < k:
        idx = cyclic_indices(S_m, k)  # pending ignored in this branch (official code)
        ages = merged_ages[idx]
        np_dtype = merged_age_dtype
    else:
        keys = merged_keys if n_p == 0 else torch.cat([merged_keys, pending_keys.to(merged_keys.dtype)])
        all_ages = merged_ages if n_p == 0 else torch.cat([merged_ages, pending_ages])
        idx = topk_indices(mean_sigmoid_scores(q, keys, score_mode), k).to(all_ages.device)
        ages = all_ages[idx]
        np_dtype = "float64" if n_p else merged_age_dtype
    return idx[age_order(ages, order_mode, np_dtype)]
