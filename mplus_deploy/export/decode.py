"""Graph family ``decode`` (spec §7.2 decode_step, R4; W_dec): a plain Llama step over the cache that
``prefill`` wrote (post-RoPE K/V), given per layer in two parts so that a step never copies the memory
prefix (docs/graphs.md, artifact format v2):

- ``prefix_k.{l}``/``prefix_v.{l}`` [Hkv, P, Dh]: the memory prefix (bos, retrieved LTM, STM), read only;
- ``past_k.{l}``/``past_v.{l}`` [Hkv, C, Dh]: the tail (prompt + tokens so far), returned with the new row
  appended as ``present_k.{l}``/``present_v.{l}`` [Hkv, C+1, Dh].

Attention runs over both blocks without concatenating them (``common.attend_split``).
"""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_GENERATE
from mplus_deploy.artifact.graph_io import PAST, PREFIX, PRESENT

from .common import GraphSpec, IOSpec, LayerView, Limits, Rope, lm_head_for_export, lm_logits

NAME = "decode"


class Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(LayerView(layer) for layer in model.model.layers)
        self.norm = model.model.norm
        self.lm_head = lm_head_for_export(model)
        self.rope = Rope(model)

    def forward(self, ids, pos, *cache):
        """``cache``: per layer ``prefix_k, prefix_v, past_k, past_v`` (the graph's input order)."""
        x = self.embed_tokens(ids)
        cos, sin = self.rope(pos.reshape(1))
        present = []
        for l, layer in enumerate(self.layers):
            pk, pv, tk, tv = cache[4 * l : 4 * l + 4]
            x, k, v = layer("over_split_prefix", x, pk, pv, tk, tv, cos, sin, ADAPTER_GENERATE)
            present += [k, v]
        return (lm_logits(self.norm, self.lm_head, self.embed_tokens, x), *present)


def tail_range(cfg) -> tuple[int, int, int]:
    """(min, opt, max) of the tail length C: a prompt of >= 1 token, at most max_window - 1 rows before a step."""
    mx = max(1, cfg.max_window - 1)
    return 1, max(1, min(16, mx)), mx


def spec(cfg, limits: Limits) -> GraphSpec:
    L, Hkv, Dh, V, P = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.vocab_size, cfg.prefix_len
    ins = [IOSpec("ids", [1], "int64"), IOSpec("pos", [], "int64")]
    outs = [IOSpec("logits", [1, V], "float32")]
    for l in range(L):
        ins += [IOSpec(f"{n}.{l}", [Hkv, P, Dh], "float") for n in PREFIX]
        ins += [IOSpec(f"{n}.{l}", [Hkv, "C", Dh], "float") for n in PAST]
        outs += [IOSpec(f"{n}.{l}", [Hkv, "C+1", Dh], "float") for n in PRESENT]
    return GraphSpec(
        name=NAME, inputs=ins, outputs=outs, dims={"C": tail_range(cfg)}, adapter=ADAPTER_GENERATE,
        notes=f"plain Llama step (R4) over a read-only memory prefix of P = {P} rows per layer and a tail of C rows "
              "(prompt + tokens so far); pos = P + C for a cache without gaps",
        extra={"prefix_len": P},
    )


def sample(cfg, g: torch.Generator, C: int, dtype) -> dict:
    """Random feeds with a tail of C rows (pos = P + C)."""
    L, Hkv, Dh, P = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.prefix_len
    f = {"ids": torch.randint(0, cfg.vocab_size, (1,), generator=g), "pos": torch.tensor(P + C, dtype=torch.int64)}
    for l in range(L):
        for n in PREFIX:
            f[f"{n}.{l}"] = torch.randn(Hkv, P, Dh, generator=g).to(dtype)
        for n in PAST:
            f[f"{n}.{l}"] = torch.randn(Hkv, C, Dh, generator=g).to(dtype)
    return f


def validation_shapes(cfg, limits: Limits) -> list[int]:
    """Tail lengths C; the first is the export example (not 1: a dynamic dim traced at size 1 is fragile)."""
    return sorted({min(7, tail_range(cfg)[2]), 1}, reverse=True)


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
    """``forward.decode_step`` over the concatenated cache [prefix, tail]; present = the grown tail."""
    L = model.config.num_hidden_layers
    P = feeds["prefix_k.0"].shape[1]
    cache = [(torch.cat([feeds[f"prefix_k.{l}"], feeds[f"past_k.{l}"]], dim=1),
              torch.cat([feeds[f"prefix_v.{l}"], feeds[f"past_v.{l}"]], dim=1)) for l in range(L)]
    logits = F_.decode_step(model, int(feeds["ids"][0]), int(feeds["pos"]), cache)
    out = {"logits": logits[None]}
    for l, (k, v) in enumerate(cache):
        out[f"present_k.{l}"], out[f"present_v.{l}"] = k[:, P:], v[:, P:]
    return out
