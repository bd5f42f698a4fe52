"""Retrieval plugins (issue 6): top-k LTM retrieval and memory gather.

Public API (all int64 [k] indices into the keys/pool rows, oldest first):

* :func:`topk_retrieve` / :func:`memory_gather` — the reference (fp32, :mod:`mplus_deploy.model.retrieval`).
* :func:`topk_retrieve_chunked` — CPU fast path (chunked over S, never [T, S]); same result.
* :func:`topk_retrieve_bf16` — opt-in CPU prefilter: bf16 GEMM ranking, exact fp32 rescoring of the top
  ``k * oversample`` (docs/plugins.md; equal to the reference unless scores crowd at the cut).
* :func:`topk_retrieve_triton` / :func:`memory_gather_triton` — Triton kernels (GPU, or CPU with
  ``TRITON_INTERPRET=1``); imported lazily so this package imports without triton.
* :mod:`.onnx_ops` — ONNX schemas (domain ``mplus``), standard-op lowering, fuse/lower, oracles.
* :mod:`.trt` — TensorRT QDP registration (``available()`` / ``unavailable_reason()``) and RTX checks.
"""
from __future__ import annotations

from .cpu import topk_retrieve_bf16, topk_retrieve_chunked
from .reference import exact_topk, memory_gather, topk_retrieve

__all__ = [
    "topk_retrieve", "memory_gather", "topk_retrieve_chunked", "topk_retrieve_bf16", "topk_retrieve_triton",
    "memory_gather_triton", "exact_topk",
]


def topk_retrieve_triton(*args, **kwargs):
    from .triton_kernels import topk_retrieve_triton as f

    return f(*args, **kwargs)


def memory_gather_triton(*args, **kwargs):
    from .triton_kernels import memory_gather_triton as f

    return f(*args, **kwargs)
