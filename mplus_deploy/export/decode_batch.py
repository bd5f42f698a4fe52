"""Graph family ``decode_batch`` (issue 19, artifact format v4): one ``decode`` step for B sequences at once, each
over its **own** memory prefix and its own tail length, so that many users' generations share one weight read.

Inputs (per layer l; B sequences, C = the tail capacity of the runtime's buffers):

- ``ids`` [B] int64: each sequence's last token; ``tail_len`` [B] int64: its valid tail rows (prompt + tokens so
  far, 1 <= tail_len <= C); its position is ``P + tail_len`` (a cache without gaps, as ``decode``'s pos);
- ``prefix_k.{l}``/``prefix_v.{l}`` [B, Hkv, P, Dh]: each sequence's post-RoPE memory prefix (bos, its retrieved
  LTM rows, its STM), read only;
- ``past_k.{l}``/``past_v.{l}`` [B, Hkv, C, Dh]: each sequence's tail, rows >= tail_len ignored (masked).

Outputs: ``logits`` [B, V] fp32 and only the step's new rows ``new_k.{l}``/``new_v.{l}`` [B, Hkv, 1, Dh] (post-RoPE):
the runtime writes them into its buffers at ``tail_len`` (``runtime.batch``), so a step copies no cache at all.

Per sequence this is exactly ``decode`` over ``[prefix_b, tail_b[:tail_len_b]]``: the masked rows get a score of
-inf (probability exactly 0); the new row's score is the last column of one fp32 softmax over [prefix, tail, new].
Validated against ``forward.decode_step`` run once per sequence (``reference``).
"""
from __future__ import annotations

import math

import torch

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_GENERATE
from mplus_deploy.artifact.graph_io import PAST, PREFIX

from .common import GraphSpec, IOSpec, LayerView, Limits, lm_logits
from .decode import Decode

NAME = "decode_batch"
NEW = ("new_k", "new_v")


NEG_INF = float("-inf")


def _rot(x: torch.Tensor, h: int) -> torch.Tensor:
    """``rope.rotate_half`` with the half width given (a constant slice, not one read from the tensor's shape)."""
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def attend_batched(q, pk, pv, tk, tv, kn, vn, valid, P: int, heads: tuple[int, int, int]):
    """Attention of one query row per sequence. q [B, H, Dh]; prefix pk/pv [B, Hkv, P, Dh]; tail tk/tv
    [B, Hkv, C, Dh] with ``valid`` [B, C] bool; the row's own key/value kn/vn [B, Hkv, Dh] → [B, H*Dh].
    ``P`` and ``heads`` = (H, Hkv, Dh) are the config's numbers (python ints).

    Shape-free: every reshape and slice uses constants (-1 for B, ``P`` and -1 for the tail's end), so the graph
    computes no shapes at run time (with B and C dynamic, sizes read from tensors were ~45 Shape/Gather/Unsqueeze/
    Concat nodes per layer, ~1,350 per step: the batched step of one sequence ran 25 % slower than ``decode``)."""
    H, n_kv, Dh = heads
    qg = q.reshape(-1, n_kv, H // n_kv, Dh) * (1.0 / math.sqrt(Dh))  # the softmax scale on g rows, not P + C + 1
    qt = qg.transpose(-1, -2)  # [B, Hkv, Dh, g]
    # keys @ qᵀ, then a transpose of the small result: the GEMM streams the P (C) key rows as its M side and packs
    # only the g query columns (q @ kᵀ packs every sequence's keys as the B side; 35 % slower at B=8 on the demo)
    s_p = torch.matmul(pk, qt).transpose(-1, -2)  # [B, Hkv, g, P]
    s_t = torch.matmul(tk, qt).transpose(-1, -2)  # [B, Hkv, g, C]
    s_t = torch.where(valid[:, None, None, :], s_t, torch.tensor(NEG_INF, dtype=s_t.dtype))
    s_n = (qg * kn[:, :, None, :]).sum(-1, keepdim=True)  # [B, Hkv, g, 1]
    scores = torch.cat([s_p, s_t, s_n], dim=-1)
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    o = torch.matmul(p[..., :P], pv) + torch.matmul(p[..., P:-1], tv) + p[..., -1:] * vn[:, :, None, :]
    return o.reshape(-1, H * Dh)


def step_layer(layer: LayerView, x, pk, pv, tk, tv, valid, cos, sin, adapter, P: int):
    """One decoder layer for B rows ``x`` [B, d] (cos/sin [B, Dh]) → (y [B, d], new k/v [B, Hkv, 1, Dh]).
    The projections and RoPE of ``layers.Attention.q/kv`` and ``rope``, written with constant shapes."""
    att = layer.self_attn
    H, Hkv, Dh = att.H, att.Hkv, att.Dh
    xn = layer.input_layernorm(x)
    c, s_ = cos[:, None, :], sin[:, None, :]
    q = att.q_proj(xn, adapter).view(-1, H, Dh)  # [B, H, Dh]
    q = q * c + _rot(q, Dh // 2) * s_
    k = att.k_proj(xn, adapter).view(-1, Hkv, Dh)  # [B, Hkv, Dh]
    k = k * c + _rot(k, Dh // 2) * s_
    v = att.v_proj(xn, adapter).view(-1, Hkv, Dh)
    y = layer.tail(x, attend_batched(q, pk, pv, tk, tv, k, v, valid, P, (H, Hkv, Dh)), adapter)
    return y, k[:, :, None, :], v[:, :, None, :]


class DecodeBatch(Decode):
    """``decode``'s modules (embedding, layer views, norm, lm_head, RoPE); a batched ``forward``."""

    def __init__(self, model):
        super().__init__(model)
        self.prefix_len = model.config.prefix_len

    def forward(self, ids, tail_len, *cache):
        """``cache``: per layer ``prefix_k, prefix_v, past_k, past_v`` (the graph's input order)."""
        x = self.embed_tokens(ids)
        cos, sin = self.rope(tail_len + self.prefix_len)
        C = cache[2].shape[2]
        valid = torch.arange(C, device=ids.device)[None, :] < tail_len[:, None]
        new = []
        for l, layer in enumerate(self.layers):
            pk, pv, tk, tv = cache[4 * l: 4 * l + 4]
            x, k, v = layer("step_batched", x, pk, pv, tk, tv, valid, cos, sin, ADAPTER_GENERATE, self.prefix_len)
            new += [k, v]
        return (lm_logits(self.norm, self.lm_head, self.embed_tokens, x), *new)


def batch_range(limits: Limits) -> tuple[int, int, int]:
    mx = max(1, int(limits.max_batch))
    return 1, max(1, min(8, mx)), mx


def spec(cfg, limits: Limits) -> GraphSpec:
    L, Hkv, Dh, V, P = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.vocab_size, cfg.prefix_len
    ins = [IOSpec("ids", ["B"], "int64"), IOSpec("tail_len", ["B"], "int64")]
    outs = [IOSpec("logits", ["B", V], "float32")]
    for l in range(L):
        ins += [IOSpec(f"{n}.{l}", ["B", Hkv, P, Dh], "float") for n in PREFIX]
        ins += [IOSpec(f"{n}.{l}", ["B", Hkv, "C", Dh], "float") for n in PAST]
        outs += [IOSpec(f"{n}.{l}", ["B", Hkv, 1, Dh], "float") for n in NEW]
    return GraphSpec(
        name=NAME, inputs=ins, outputs=outs, dims={"B": batch_range(limits), "C": (1, min(16, cfg.max_window), cfg.max_window)},
        adapter=ADAPTER_GENERATE,
        notes=f"one decode step for B sequences, each over its own memory prefix of P = {P} rows per layer and its "
              "tail rows [0, tail_len) of a C-row buffer; position P + tail_len; returns only the new K/V rows",
        extra={"prefix_len": P},
    )


def sample(cfg, g: torch.Generator, B: int, C: int, dtype) -> dict:
    """Random feeds: B sequences with distinct tail lengths in [1, C] (the buffers' other rows random too)."""
    L, Hkv, Dh, P = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.prefix_len
    lens = torch.tensor([C] + [1 + (b * 5) % C for b in range(1, B)], dtype=torch.int64)
    f = {"ids": torch.randint(0, cfg.vocab_size, (B,), generator=g), "tail_len": lens}
    for l in range(L):
        for n in PREFIX:
            f[f"{n}.{l}"] = torch.randn(B, Hkv, P, Dh, generator=g).to(dtype)
        for n in PAST:
            f[f"{n}.{l}"] = torch.randn(B, Hkv, C, Dh, generator=g).to(dtype)
    return f


def validation_shapes(cfg, limits: Limits) -> list[tuple[int, int]]:
    """(B, C); the first is the export example (no dynamic dim traced at size 1)."""
    B = min(3, batch_range(limits)[2])
    C = min(7, cfg.max_window)
    return [(max(2, B), max(2, C))] + [(1, 1)]


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
    """``forward.decode_step`` once per sequence over its [prefix_b, tail_b[:tail_len_b]]."""
    L, P = model.config.num_hidden_layers, model.config.prefix_len
    B = feeds["ids"].shape[0]
    logits, new = [], {f"{n}.{l}": [] for l in range(L) for n in NEW}
    for b in range(B):
        n = int(feeds["tail_len"][b])
        cache = [(torch.cat([feeds[f"prefix_k.{l}"][b], feeds[f"past_k.{l}"][b, :, :n]], dim=1),
                  torch.cat([feeds[f"prefix_v.{l}"][b], feeds[f"past_v.{l}"][b, :, :n]], dim=1)) for l in range(L)]
        logits.append(F_.decode_step(model, int(feeds["ids"][b]), P + n, cache))
        for l, (k, v) in enumerate(cache):
            new[f"new_k.{l}"].append(k[:, -1:])
            new[f"new_v.{l}"].append(v[:, -1:])
    return {"logits": torch.stack(logits), **{k: torch.stack(v) for k, v in new.items()}}
