"""``--retrieval-op plugin``: the per-layer retrieval traced as the ``mplus::TopKRetrieve`` and
``mplus::MemoryGather`` custom nodes (docs/plugins.md, ``plugins/onnx_ops.py`` schemas) instead of standard ops.

Each op is a ``torch.autograd.Function``: its ``forward`` is the standard-op computation (the trace runs it,
so shapes and the example outputs are those of the standard graph) and its ``symbolic`` writes the custom
node with the TensorRT plugin attributes. Which form a graph gets is the wrapper's ``retrieval_op``
attribute (``RETRIEVAL_OPS``); the standard form stays the default. ONNX Runtime runs plugin graphs by
lowering them at load (``plugins.onnx_ops.lower_retrieval``), TensorRT with ``plugins.trt.register_plugins``.
"""
from __future__ import annotations

import torch

from mplus_deploy.plugins.onnx_ops import DOMAIN, PLUGIN_ATTRS

RETRIEVAL_OPS = ("standard", "plugin")


def check_retrieval_op(op: str) -> str:
    if op not in RETRIEVAL_OPS:
        raise ValueError(f"retrieval_op must be one of {RETRIEVAL_OPS}, got {op!r}")
    return op


def _attrs() -> dict:
    return {f"{k}_s": v for k, v in PLUGIN_ATTRS.items()}


class TopKRetrieve(torch.autograd.Function):
    """(q [T, d_r], keys [S, d_r], ages [S] int64, valid_len [], merged_len []) → indices [K0], prefix order."""

    @staticmethod
    def forward(ctx, q, keys, ages, valid_len, merged_len, K0: int, chunks: int):
        from .retriever import select_indices

        return select_indices(q, keys, ages, valid_len, merged_len, K0, chunks)

    @staticmethod
    def symbolic(g, q, keys, ages, valid_len, merged_len, K0: int, chunks: int):
        out = g.op(f"{DOMAIN}::TopKRetrieve", q, keys, valid_len, ages, merged_len, k_i=int(K0),
                   score_chunks_i=int(chunks), **_attrs())
        out.setType(ages.type().with_dtype(torch.int64).with_sizes([int(K0)]))
        return out


class MemoryGather(torch.autograd.Function):
    """``pool.index_select(axis, indices)``."""

    @staticmethod
    def forward(ctx, pool, indices, axis: int):
        return torch.index_select(pool, axis, indices)

    @staticmethod
    def symbolic(g, pool, indices, axis: int):
        out = g.op(f"{DOMAIN}::MemoryGather", pool, indices, axis_i=int(axis), **_attrs())
        sizes = pool.type().varyingSizes()
        if sizes is not None:
            sizes = list(sizes)
            sizes[axis] = None
            out.setType(pool.type().with_sizes(sizes))
        return out


def select(op: str, q, keys, ages, valid_len, merged_len, K0: int, chunks: int):
    """The K0 retrieved indices in the form ``op`` names."""
    if op == "plugin":
        return TopKRetrieve.apply(q, keys, ages, valid_len, merged_len, K0, chunks)
    from .retriever import select_indices

    return select_indices(q, keys, ages, valid_len, merged_len, K0, chunks)


def gather(op: str, pool, indices, axis: int):
    return MemoryGather.apply(pool, indices, axis) if op == "plugin" else torch.index_select(pool, axis, indices)
