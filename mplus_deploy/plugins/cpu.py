"""CPU fast path for top-k retrieval (spec R7): chunked over S, never materialises [T, S].

Each chunk computes ``q @ keys_c.T`` into a reused buffer, applies the sigmoid in place and reduces
over T at once, so only ``T x chunk`` floats are alive (a few MB, cache-resident) instead of the
1.3 GB [T, S] matrix of the naive path. The [S] score vector (S floats) is kept; selection then uses
the exact tie rule of the reference.
"""
from __future__ import annotations

import torch

from .reference import check_inputs, exact_topk, order_oldest_first, small_ltm_indices

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
    valid_len = check_inputs(q, keys, valid_len, ages, k)
    if valid_len < k:
        return small_ltm_indices(valid_len, k, ages, device=keys.device)
    scores = chunked_scores(q, keys[:valid_len], chunk)
    return order_oldest_first(exact_topk(scores, k), ages)


def naive_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The naive path (benchmark baseline only): the whole [T, S] matrix, then sigmoid and mean."""
    return torch.sigmoid(q.float() @ keys.float().T).mean(0)


# ------------------------------------------------------------------------------------------------
# Opt-in: bf16 prefilter + exact fp32 rescoring (not the default; docs/plugins.md "bf16 prefilter")
def _sigmoid_mean_rows(y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(y.float()).mean(-1)


_FUSED = {}
BF16_CHUNK = 8192  # [8192, T] bf16 GEMM blocks: oneDNN's AMX GEMM is ~1.5x faster than at 2048 here


def _fused_sigmoid_mean():
    """``_sigmoid_mean_rows`` compiled by TorchInductor (one vectorised C++ loop: bf16 load, fp32 sigmoid,
    row sum; no fp32 copy of the block). Static shapes (dynamic shapes measured 2x slower): one compile per
    (chunk, T), ~5-20 s; ragged tail chunks run eager."""
    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(_sigmoid_mean_rows, dynamic=False)
    return _FUSED["fn"]


def bf16_keys(keys: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of the LTM keys :func:`bf16_scores` ranks with. Keys only change when memory is
    written, so a runtime builds this once per memory state (like the LTM K/V cache) and passes it in."""
    return keys.to(torch.bfloat16).contiguous()


def bf16_scores(q: torch.Tensor, keys: torch.Tensor, chunk: int = BF16_CHUNK, compiled: bool = False,
                keys_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate ``mean_T sigmoid(q @ keys.T)`` → fp32 [S] from a bf16 GEMM (AMX / AVX512-BF16 through
    oneDNN where the CPU has them), sigmoid and mean in fp32. Computed as ``keys_c @ q.T`` ([chunk, T]) so
    the mean over T runs along contiguous memory. ``compiled``: fuse the sigmoid and mean with
    TorchInductor (needs a C++ compiler). ``keys_bf16``: :func:`bf16_keys` of ``keys``, built once."""
    if keys_bf16 is not None and (keys_bf16.dtype != torch.bfloat16 or keys_bf16.shape[0] < keys.shape[0]):
        raise ValueError(f"keys_bf16 must be a bf16 copy of the keys ({tuple(keys.shape)}), got "
                         f"{keys_bf16.dtype} {tuple(keys_bf16.shape)}")
    qb = q.to(torch.bfloat16).contiguous()
    S, T = keys.shape[0], q.shape[0]
    out = torch.empty(S, dtype=torch.float32, device=q.device)
    bb = torch.empty(min(chunk, S), T, dtype=torch.bfloat16, device=q.device)
    bf = None
    fused = _fused_sigmoid_mean() if compiled else None
    for s0 in range(0, S, chunk):
        n = min(chunk, S - s0)
        kc = keys_bf16[s0 : s0 + n] if keys_bf16 is not None else keys[s0 : s0 + n].to(torch.bfloat16)
        torch.mm(kc, qb.T, out=bb[:n])
        if fused is not None and n == chunk:
            out[s0 : s0 + n] = fused(bb)
            continue
        if bf is None:
            bf = torch.empty(min(chunk, S), T, dtype=torch.float32, device=q.device)
        f = bf[:n]
        f.copy_(bb[:n])
        torch.sigmoid_(f)
        torch.mean(f, 1, out=out[s0 : s0 + n])
    return out


def topk_retrieve_bf16(
    q: torch.Tensor, keys: torch.Tensor, valid_len: int, ages: torch.Tensor, k: int, oversample: float = 2.0,
    chunk: int = BF16_CHUNK, compiled: bool = False, keys_bf16: torch.Tensor | None = None,
) -> torch.Tensor:
    """Opt-in fast path: bf16 scores pick ``k * oversample`` candidates (rounded up to a multiple of 64), whose
    scores are then recomputed in fp32 with the reference's arithmetic and top-k'd with its tie rule. With
    MKL the recomputed scores are bitwise the reference's when the GEMM width is a multiple of 64 (a
    ragged tail can differ by 1 ulp); tests/plugins/test_reference_cpu.py checks both.

    Equals :func:`topk_retrieve` whenever every true top-k row is among the candidates, i.e. whenever the
    bf16 score error (~1e-5 on N(0, 1) data, dk=256) is smaller than the score gap between the k-th and the
    ``k * oversample``-th row. That holds with a wide margin on the benchmark data but is *not* guaranteed
    (adversarial near-ties around the candidate cut can differ), so it is never the default. A certified
    variant (rigorous per-key error bounds) was measured and does not prune: see docs/plugins.md.
    """
    import math

    valid_len = check_inputs(q, keys, valid_len, ages, k)
    if oversample < 1.0:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    if valid_len < k:
        return small_ltm_indices(valid_len, k, ages, device=keys.device)
    m = math.ceil(k * oversample / 64) * 64  # GEMM width a multiple of 64: bitwise the reference's columns (MKL)
    if m >= valid_len:
        return topk_retrieve_chunked(q, keys, valid_len, ages, k)
    approx = bf16_scores(q, keys[:valid_len], chunk, compiled, keys_bf16)
    cand = torch.sort(torch.topk(approx, m, sorted=False).indices).values
    exact = chunked_scores(q, keys.index_select(0, cand))
    return order_oldest_first(cand[exact_topk(exact, k)], ages)
