"""Weights stored in one dtype, arithmetic in another ("bf16 storage, fp32 compute").

The bf16 artifact's CPU policy (docs/design-export.md "Precision"): weights stay bf16 in memory and on
disk, every product runs in fp32. A bf16 value is exact in fp32, so this computes what an fp32 model
loaded from the bf16 checkpoint computes, at half its weight bytes. :func:`upcast_compute` turns a
loaded reference model into that policy in place:

- ``nn.Linear`` (and the LoRA / retriever / lm_head linears) cast their weight to the input's dtype per
  call, in row blocks of at most ``CHUNK_BYTES`` so a 128256 x 4096 lm_head never has a 2 GiB fp32
  temporary;
- the embedding gathers bf16 rows, then casts them (never the whole table);
- ``model.dtype`` reports the compute dtype, so activations and memory rows enter the layers in fp32;
  RMSNorm weights, ``bos_embedding`` and ``new_memory_positional_emb`` promote by dtype rules;
- the memory state stays in its dtype too (every reader casts rows to ``model.dtype`` first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _PlainLinear

CHUNK_BYTES = 256 << 20  # largest compute-dtype weight temporary


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.dtype == x.dtype:
        return F.linear(x, w)
    step = max(1, CHUNK_BYTES // max(1, w.shape[1] * x.element_size()))
    if step >= w.shape[0]:
        return F.linear(x, w.to(x.dtype))
    return torch.cat([F.linear(x, w[i:i + step].to(x.dtype)) for i in range(0, w.shape[0], step)], dim=-1)


class _UpcastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight)


class _UpcastPlainLinear(_PlainLinear):
    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:  # noqa: ARG002
        return _linear(x, self.weight)


class _UpcastEmbedding(nn.Embedding):
    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.compute_dtype)


def upcast_compute(model, compute: torch.dtype = torch.float32):
    """Keep ``model``'s weights in their dtype and compute in ``compute`` (in place; returns the model)."""
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = _UpcastLinear
        elif type(mod) is _PlainLinear:
            mod.__class__ = _UpcastPlainLinear
        elif type(mod) is nn.Embedding:
            mod.__class__ = _UpcastEmbedding
            mod.compute_dtype = compute
    model.compute_dtype = compute
    model._rope = None
    return model
