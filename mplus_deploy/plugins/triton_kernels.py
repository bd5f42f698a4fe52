"""Triton kernels for retrieval (spec R7/R8); the sources the TensorRT AOT plugins compile to PTX.

* ``score_kernel``: fused streaming ``mean_T sigmoid(q @ keys.T)``. One program owns a tile of
  ``BS`` key rows and streams over T in ``BT``-row tiles (and over d in ``BD`` slices), reducing the
  sigmoid over T in registers: only the [S] score vector is written, never [T, S]. fp32 dot with
  ``input_precision="tf32x3"`` by default (fp32-accurate on tensor cores; "ieee" and "tf32" selectable).
* ``gather_kernel``: vectorised row gather ``out[i, :] = pool[idx[i], :]``; ``pool`` may be any
  pointer the device can read, including pinned (host-mapped, UVA) host memory.

Selection after scoring (exact top-k with the tie rule, ascending, stable oldest-first) runs as
torch ops on the scores' device (:func:`mplus_deploy.plugins.reference.exact_topk`).

On CPU, run with ``TRITON_INTERPRET=1`` set before triton is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_inputs, exact_topk, merged_rows, order_oldest_first, small_ltm_indices


@triton.jit
def score_kernel(
    q_ptr, k_ptr, out_ptr, T, S, D,
    stride_qt, stride_kd_row,
    BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr = "ieee",
):
    pid = tl.program_id(0)
    offs_s = pid * BS + tl.arange(0, BS)
    mask_s = offs_s < S
    acc = tl.zeros((BS,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        offs_t = t0 + tl.arange(0, BT)
        mask_t = offs_t < T
        qk = tl.zeros((BT, BS), dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask_d = offs_d < D
            qt = tl.load(q_ptr + offs_t[:, None] * stride_qt + offs_d[None, :],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            kt = tl.load(k_ptr + offs_s[None, :].to(tl.int64) * stride_kd_row + offs_d[:, None],
                         mask=mask_s[None, :] & mask_d[:, None], other=0.0).to(tl.float32)
            qk = tl.dot(qt, kt, acc=qk, input_precision=PREC)
        sg = 1.0 / (1.0 + tl.exp(-qk))
        sg = tl.where(mask_t[:, None], sg, 0.0)
        acc += tl.sum(sg, axis=0)
    tl.store(out_ptr + offs_s, acc / T, mask=mask_s)


@triton.jit
def gather_kernel(pool_ptr, idx_ptr, out_ptr, D, stride_pool, stride_out, stride_pool_b, stride_out_b,
                  BLOCK_D: tl.constexpr):
    """``out[b, i, :] = pool[b, idx[i], :]``; grid (rows, D blocks, batches). A 2-D pool is one batch."""
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    src = tl.load(idx_ptr + row).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    v = tl.load(pool_ptr + b * stride_pool_b + src * stride_pool + offs, mask=m)
    tl.store(out_ptr + b * stride_out_b + row.to(tl.int64) * stride_out + offs, v, mask=m)


def triton_scores(q: torch.Tensor, keys: torch.Tensor, BT: int = 128, BS: int = 128, BD: int = 32,
                  num_warps: int = 8, num_stages: int = 3, precision: str = "tf32x3") -> torch.Tensor:
    """fp32 [S] scores from the fused kernel (q, keys: fp32/fp16/bf16 on the same device).

    ``precision`` is the fp32 dot's ``input_precision``: "tf32x3" (default: tensor cores, three TF32
    passes; on an H200 at T=2048, S=160k: |Δscore| ≤ 1.2e-7, retrieved set and order identical to
    the fp32 reference, 2.76 ms = 62 TFLOP/s, 1.7x torch's fp32 path — bench/RESULTS.md), "ieee"
    (exact fp32 FMA, 12.7 ms) or "tf32" (1.0 ms, |Δscore| ~3e-5: an opt-in that may change boundary
    members of the retrieved set). The interpreter (CPU) always runs "ieee". The defaults are the
    fastest exact tile measured on the H200."""
    if precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"precision must be 'ieee', 'tf32x3' or 'tf32', got {precision!r}")
    q = q.contiguous()
    keys = keys.contiguous()
    T, D = q.shape
    S = keys.shape[0]
    out = torch.empty(S, dtype=torch.float32, device=q.device)
    kw = {} if q.device.type == "cpu" else {"num_warps": num_warps, "num_stages": num_stages}
    score_kernel[(triton.cdiv(S, BS),)](q, keys, out, T, S, D, q.stride(0), keys.stride(0),
                                        BT=BT, BS=BS, BD=BD, PREC=precision if q.device.type != "cpu" else "ieee", **kw)
    return out


def topk_retrieve_triton(q: torch.Tensor, keys: torch.Tensor, valid_len: int, ages: torch.Tensor, k: int,
                         merged_len=None, **tile) -> torch.Tensor:
    """Same contract as the reference ``topk_retrieve``; scores from :func:`score_kernel`."""
    valid_len = check_inputs(q, keys, valid_len, ages, k)
    m = merged_rows(valid_len, merged_len)
    if m < k:
        return small_ltm_indices(m, k, ages, device=keys.device)
    scores = triton_scores(q, keys[:valid_len], **tile)
    return order_oldest_first(exact_topk(scores, k), ages)


def memory_gather_triton(pool: torch.Tensor, indices: torch.Tensor, out_device=None,
                         BLOCK_D: int = 1024, axis: int = 0) -> torch.Tensor:
    """``pool.index_select(axis, indices)`` written on ``out_device`` (default: the indices' device): a
    [N, D] pool on axis 0, or a [B, N, D] pool (the prefill's per-layer LTM K/V [Hkv, S, Dh]) on axis 1.

    ``pool`` may be a pinned host tensor: the kernel then reads it over the bus (host-mapped)."""
    if (pool.dim(), axis) not in ((2, 0), (3, 1)) or pool.stride(-1) != 1:
        raise ValueError(f"pool must be [N, D] (axis 0) or [B, N, D] (axis 1) with contiguous rows; got shape "
                         f"{tuple(pool.shape)}, axis {axis}")
    dev = torch.device(out_device) if out_device is not None else indices.device
    idx = indices.to(dev, torch.int64).contiguous()
    n, D = idx.numel(), pool.shape[-1]
    B = pool.shape[0] if pool.dim() == 3 else 1
    out = torch.empty(*((B,) if pool.dim() == 3 else ()), n, D, dtype=pool.dtype, device=dev)
    if n and B:
        sb_p, sb_o = (pool.stride(0), out.stride(0)) if pool.dim() == 3 else (0, 0)
        gather_kernel[(n, triton.cdiv(D, BLOCK_D), B)](pool, idx, out, D, pool.stride(-2), out.stride(-2), sb_p, sb_o,
                                                      BLOCK_D=BLOCK_D)
    return out
