"""Graph family ``decode`` (spec §7.2 decode_step, R4; W_dec): a plain Llama step over the prefix cache
(post-RoPE K/V; the first P rows are the memory prefix written by ``prefill``)."""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_GENERATE

from .common import GraphSpec, IOSpec, LayerView, Limits, Rope, lm_logits

NAME = "decode"


class Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(LayerView(layer) for layer in model.model.layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rope = Rope(model)

    def forward(self, ids, pos, past_k, past_v):
        x = self.embed_tokens(ids)
        cos, sin = self.rope(pos.reshape(1))
        ks, vs = [], []
        for l, layer in enumerate(self.layers):
            x, k, v = layer("over_prefix", x, past_k[l], past_v[l], cos, sin, ADAPTER_GENERATE)
            ks.append(k)
            vs.append(v)
        return lm_logits(self.norm, self.lm_head, self.embed_tokens, x), torch.stack(ks), torch.stack(vs)


def spec(cfg, limits: Limits) -> GraphSpec:
    L, Hkv, Dh, V, P = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.vocab_size, cfg.prefix_len
    return GraphSpec(
        name=NAME,
        inputs=[IOSpec("ids", [1], "int64"), IOSpec("pos", [], "int64"),
                IOSpec("past_k", [L, Hkv, "C", Dh], "float"), IOSpec("past_v", [L, Hkv, "C", Dh], "float")],
        outputs=[IOSpec("logits", [1, V], "float32"), IOSpec("present_k", [L, Hkv, "C+1", Dh], "float"),
                 IOSpec("present_v", [L, Hkv, "C+1", Dh], "float")],
        dims={"C": (P + 1, P + min(16, cfg.max_window - 1), P + cfg.max_window - 1)}, adapter=ADAPTER_GENERATE,
        notes="plain Llama step over a prefix cache (R4); pos = C for a cache without gaps",
    )


def sample(cfg, g: torch.Generator, C: int, dtype) -> dict:
    L, Hkv, Dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh
    return {"ids": torch.randint(0, cfg.vocab_size, (1,), generator=g), "pos": torch.tensor(C, dtype=torch.int64),
            "past_k": torch.randn(L, Hkv, C, Dh, generator=g).to(dtype), "past_v": torch.randn(L, Hkv, C, Dh, generator=g).to(dtype)}


def validation_shapes(cfg, limits: Limits) -> list[int]:
    P = cfg.prefix_len
    return [P + 1, P + 7]


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
    L = model.config.num_hidden_layers
    cache = [(feeds["past_k"][l], feeds["past_v"][l]) for l in range(L)]
    logits = F_.decode_step(model, int(feeds["ids"][0]), int(feeds["pos"]), cache)
    return {"logits": logits[None], "present_k": torch.stack([k for k, _ in cache]), "present_v": torch.stack([v for _, v in cache])}
