"""Graph family ``memory_update`` / ``memory_update_short`` (spec §3.4, §8; W_enc = ``default`` adapter).

Per layer ``X = [bos_l, mem_tail_l, h]`` at positions 0..nb+K+T-1, ``new_memory_positional_emb`` added
to the last K rows, prefix rows (keys/values only) P = nb+K for T >= K (``memory_update``) and
P = nb+T for T < K (``memory_update_short``, the old tail's last K-T rows become query rows).
The two prefix lengths are two graphs because P is a data-dependent branch (spec §13.1 hazard 3).
"""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_UPDATE

from .common import GraphSpec, IOSpec, LayerView, Limits, Rope, causal_bias

NAME, NAME_SHORT = "memory_update", "memory_update_short"


class MemoryUpdate(nn.Module):
    def __init__(self, model, short: bool):
        super().__init__()
        cfg = model.config
        self.K, self.nb, self.short = cfg.K, int(cfg.add_bos_embedding), short
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(LayerView(layer) for layer in model.model.layers)
        if self.nb:
            self.bos_embedding = model.bos_embedding
        self.new_memory_positional_emb = model.new_memory_positional_emb
        self.rope = Rope(model)

    def forward(self, ids: torch.Tensor, mem_tail: torch.Tensor) -> torch.Tensor:
        K, nb = self.K, self.nb
        T = ids.shape[0]
        h = self.embed_tokens(ids)
        nme = self.new_memory_positional_emb.reshape(1, -1).to(h.dtype)
        cos, sin = self.rope(torch.arange(nb + K + T))
        Q = K if self.short else T
        bias = causal_bias(Q, nb + K + T, h.dtype)  # once for every layer
        last = len(self.layers) - 1
        deltas = []
        for l, layer in enumerate(self.layers):
            tail = mem_tail[l].to(h.dtype)
            pre = [self.bos_embedding[l].to(h.dtype)] if nb else []
            if self.short:  # P = nb+T: the last K rows are tail[T:] and the chunk
                xq = torch.cat([tail[T:], h]) + nme
                X = torch.cat(pre + [tail[:T], xq])
            else:  # P = nb+K: the last K rows are chunk rows
                xq = torch.cat([h[:-K], h[-K:] + nme])
                X = torch.cat(pre + [tail, xq])
            if l == last and not self.short:  # only delta = the last K rows leaves the last layer: query only them
                y = layer("direct", X, xq[T - K:], K, cos, sin, ADAPTER_UPDATE, bias[T - K:])
            else:
                y = layer("direct", X, xq, Q, cos, sin, ADAPTER_UPDATE, bias)
            deltas.append(y[y.shape[0] - K:])
            h = y[y.shape[0] - T:] if self.short else y
        return torch.stack(deltas)


def spec(cfg, limits: Limits, short: bool) -> GraphSpec:
    L, K, d = cfg.num_hidden_layers, cfg.K, cfg.hidden_size
    if short:
        dims = {"T": (1, max(1, (K - 1) // 2), K - 1)}
    else:
        dims = {"T": (K, min(limits.max_chunk, max(K, limits.max_chunk // 2)), limits.max_chunk)}
    return GraphSpec(
        name=NAME_SHORT if short else NAME,
        inputs=[IOSpec("ids", ["T"], "int64"), IOSpec("mem_tail", [L, K, d], "float")],
        outputs=[IOSpec("delta", [L, K, d], "float")],
        dims=dims, adapter=ADAPTER_UPDATE,
        notes="spec §3.4; P = bos + " + ("T (chunk < K)" if short else "K"),
    )


def sample(cfg, g: torch.Generator, T: int, dtype) -> dict:
    L, K, d = cfg.num_hidden_layers, cfg.K, cfg.hidden_size
    return {"ids": torch.randint(0, cfg.vocab_size, (T,), generator=g),
            "mem_tail": torch.randn(L, K, d, generator=g).to(dtype)}


def validation_shapes(cfg, limits: Limits, short: bool) -> list[int]:
    if short:
        return sorted({1, cfg.K - 1, max(1, cfg.K // 2)})
    return sorted({cfg.K, min(limits.max_chunk, cfg.K + 3), limits.max_chunk})


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
    """``forward.update_forward`` over the STM tail ``mem_tail`` (an initialized memory)."""
    return {"delta": F_.update_forward(model, feeds["ids"], feeds["mem_tail"])}
