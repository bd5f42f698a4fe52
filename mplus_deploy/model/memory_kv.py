"""Memory rows as keys and values (spec §12 R1/R2): the one definition of how a memory row enters a layer.

Memory rows enter a layer only through ``k_proj``/``v_proj`` of their normed vectors (W_dec), and the
retriever only through ``key_proj`` of the same normed vectors, so a row's pre-RoPE K/V and its retriever
key are computed once and rotated by slot position at use:

- ``project_layer`` / ``project_rows``: rows → (retriever keys, pre-RoPE k, v); the ``memory_project``
  graph, its export reference, the torch runner and ``MemoryKV`` all compute exactly this;
- ``prefix_kv``: the prefix layout [bos, LTM rows (retrieved), STM] of the prefill and decode graphs;
- ``MemoryKV``: a whole ``MemoryState`` projected once (the reference's fast path), keyed by its version;
- ``packed_feeds``: a ``MemoryState`` packed as the prefill graph's memory inputs (export validation; the
  runtime's ``HostMemory`` keeps the same layout incrementally).
"""
from __future__ import annotations

import weakref

import torch

from .layers import ADAPTER_GENERATE


def project_layer(model, l: int, rows: torch.Tensor, keys: bool) -> tuple:
    """Rows [n, d] of layer l → (retriever keys [n, d_r] or None, k [Hkv, n, Dh], v [Hkv, n, Dh]), pre-RoPE."""
    layer = model.model.layers[l]
    xn = layer.input_layernorm(rows.to(model.dtype))
    k, v = layer.self_attn.kv(xn, ADAPTER_GENERATE)
    return (layer.self_attn.key_proj(xn) if keys else None), k, v


def project_rows(model, rows: torch.Tensor) -> dict:
    """Rows [L, n, d] → {"keys": [L, n, d_r] (M+ only), "k"/"v": [L, Hkv, n, Dh]}: the memory_project graph."""
    with torch.no_grad():
        outs = [project_layer(model, l, rows[l], model.config.is_mplus) for l in range(model.config.num_hidden_layers)]
    out = {"k": torch.stack([k for _, k, _ in outs]), "v": torch.stack([v for _, _, v in outs])}
    if model.config.is_mplus:
        out["keys"] = torch.stack([kk for kk, _, _ in outs])
    return out


def bos_kv(model, l: int) -> tuple | None:
    """Pre-RoPE (k, v) of layer l's bos embedding row (None when the model has none)."""
    if not model.config.add_bos_embedding:
        return None
    return project_layer(model, l, model.bos_embedding[l], False)[1:]


def prefix_kv(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory prefix of one layer from its parts in slot order — bos (if any), retrieved LTM rows (M+),
    STM — each a pre-RoPE (k, v) [Hkv, n, Dh] or None → (k, v) [Hkv, P, Dh]."""
    parts = [p for p in parts if p is not None]
    return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)


class MemoryKV:
    """Every row of memory ``mem`` projected once (per layer bos, STM and the LTM pool merged + pending)."""

    def __init__(self, model, mem):
        from .forward import ltm_pool

        self.version, self._mem = mem.version, weakref.ref(mem)
        self.bos, self.stm, self.ltm = [], [], []
        with torch.no_grad():
            for l in range(model.config.num_hidden_layers):
                self.bos.append(bos_kv(model, l))
                self.stm.append(project_layer(model, l, mem.stm[l], False)[1:])
                if model.config.is_mplus:
                    self.ltm.append(project_layer(model, l, ltm_pool(mem, l), False)[1:])

    def is_for(self, mem) -> bool:
        return self._mem() is mem and self.version == mem.version

    def prefix(self, l: int, ltm_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE prefix K/V [Hkv, P, Dh] of layer l: [bos, LTM[ltm_idx], STM]."""
        ltm = None if ltm_idx is None else (self.ltm[l][0][:, ltm_idx], self.ltm[l][1][:, ltm_idx])
        return prefix_kv([self.bos[l], ltm, self.stm[l]])


def packed_feeds(cfg, mem, project) -> dict:
    """Prefill memory inputs from a ``MemoryState`` and a projector ``project(rows [L, n, d]) -> {k, v, ...}``
    (the ``memory_project`` graph or ``project_rows``). LTM pools (merged + pending) are padded to a common
    S >= K0; pad rows are masked by ``valid_len`` (docs/graphs.md)."""
    from .forward import ltm_pool

    L, N, d = cfg.num_hidden_layers, cfg.N, cfg.hidden_size
    if not cfg.is_mplus:
        p = project(mem.stm)
        return {"stm_k": p["k"], "stm_v": p["v"]}
    pools = [ltm_pool(mem, l) for l in range(L)]
    keys = [mem.ltm_keys[l] if mem.pend_keys is None else torch.cat([mem.ltm_keys[l], mem.pend_keys[l].to(mem.ltm_keys[l].dtype)])
            for l in range(L)]
    ages = [mem.ltm_ages[l] if mem.pend_ages is None else torch.cat([mem.ltm_ages[l], mem.pend_ages[l]]) for l in range(L)]
    S = max(cfg.K0, max(p.shape[0] for p in pools))
    rows = torch.zeros(L, N + S, d, dtype=mem.stm.dtype)
    rows[:, :N] = mem.stm
    kk = torch.zeros(L, S, cfg.selector_hidden_dim, dtype=keys[0].dtype)
    aa = torch.zeros(L, S, dtype=torch.int64)
    for l in range(L):
        n = pools[l].shape[0]
        rows[l, N:N + n] = pools[l].to(rows.dtype)
        kk[l, :n] = keys[l]
        aa[l, :n] = torch.round(ages[l]).to(torch.int64)
    p = project(rows)
    return {"stm_k": p["k"][:, :, :N], "stm_v": p["v"][:, :, :N], "ltm_keys": kk, "ltm_k": p["k"][:, :, N:],
            "ltm_v": p["v"][:, :, N:], "ltm_ages": aa,
            "valid_len": torch.tensor([p_.shape[0] for p_ in pools], dtype=torch.int64),
            "merged_len": torch.tensor([t.shape[0] for t in mem.ltm], dtype=torch.int64)}
