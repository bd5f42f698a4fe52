"""Explicit-tensor forward functions of M+ (gpt-fast style): the injection forward (spec §3.4),
memory-conditioned prefill with layer-interleaved retrieval (§6–§7.2) and the decode step.

Two equal paths for prefill:
- direct (faithful, default): per layer ``X = [bos, LTM_sel, STM, prompt]`` through the block;
- fast (spec §12 R1/R2): memory rows are K/V-only, so their pre-RoPE K/V are computed once per
  memory state (``MemoryKV``) and only rotated by slot position at use.
"""
from __future__ import annotations

import torch

from . import retrieval
from .layers import ADAPTER_GENERATE, ADAPTER_UPDATE, attend, layer_tail
from .rope import apply_rope


def block_direct(model, l: int, X: torch.Tensor, P: int, cos, sin, adapter: str):
    """Spec §3.3 ``block``: rows < P are prefix rows (keys/values only). Returns y, post-RoPE k, v."""
    layer = model.model.layers[l]
    xn = layer.input_layernorm(X)
    q = apply_rope(layer.self_attn.q(xn[P:], adapter), cos[P:], sin[P:])
    k, v = layer.self_attn.kv(xn, adapter)
    k = apply_rope(k, cos, sin)
    y = layer_tail(layer, X[P:], attend(q, k, v, model.attention_impl), adapter)
    return y, k, v


def block_with_prefix_kv(model, l: int, h: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, cos_q, sin_q, adapter: str):
    """Query rows ``h`` [Q, d] over post-RoPE prefix K/V ``pk``/``pv`` [Hkv, P, Dh] (R4: prefix cache)."""
    layer = model.model.layers[l]
    xn = layer.input_layernorm(h)
    q = apply_rope(layer.self_attn.q(xn, adapter), cos_q, sin_q)
    k, v = layer.self_attn.kv(xn, adapter)
    k = torch.cat([pk, apply_rope(k, cos_q, sin_q)], dim=1)
    v = torch.cat([pv, v], dim=1)
    y = layer_tail(layer, h, attend(q, k, v, model.attention_impl), adapter)
    return y, k, v


# ------------------------------------------------------------------------------- injection
@torch.no_grad()
def inject_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Spec §3.4 → delta [L, K', d] (K' = K, or min(T, K) for an uninitialized MemoryLLM)."""
    cfg, mem = model.config, model.memory
    K, N, T = cfg.K, cfg.N, ids.shape[0]
    h = model.model.embed_tokens(ids.to(model.device))
    nb = int(cfg.add_bos_embedding)
    if mem.initialized:
        P = nb + min(T, K)  # prefix_token_length = min(nb + K, R - K)
        R = nb + K + T
    else:  # MemoryLLM before its first update: no memory prefix at all (cat_memory_and_hiddens)
        P, R = 0, T
    cos, sin = model.rope_tables(torch.arange(R), h.dtype)
    nme = model.new_memory_positional_emb.reshape(1, -1).to(h.dtype)
    deltas = []
    for l in range(cfg.num_hidden_layers):
        parts = []
        if mem.initialized:
            if nb:
                parts.append(model.bos_embedding[l].to(h.dtype))
            parts.append(mem.stm[l, N - K:].to(h.dtype))
        X = torch.cat(parts + [h]) if parts else h.clone()
        X[-K:] = X[-K:] + nme
        y, _, _ = block_direct(model, l, X, P, cos, sin, ADAPTER_UPDATE)
        deltas.append(y[-K:])
        h = y[-T:]
    return torch.stack(deltas)


# ------------------------------------------------------------------------------- retrieval
def retriever_query(model, l: int, h: torch.Tensor, mode: str) -> torch.Tensor:
    """f_q(input_layernorm_l(h)) [T, d_r]; "bf16" mode rounds after each op the official bf16 path runs."""
    layer = model.model.layers[l]
    proj = layer.self_attn.query_proj
    if mode != "bf16":
        return proj(layer.input_layernorm(h))
    b = retrieval._bf16
    x = b(layer.input_layernorm(b(h)))
    x = b(x @ b(proj[0].weight.float()).T)
    x = b(torch.nn.functional.silu(x))
    return b(x @ b(proj[2].weight.float()).T)


def retrieve_indices(model, l: int, h: torch.Tensor) -> torch.Tensor:
    """Indices into ``concat(ltm[l], pending[l])`` of the K0 rows of layer l, in prefix order."""
    mem, cfg = model.memory, model.config
    mode = model.score_mode()
    S_m = mem.ltm[l].shape[0]
    q = retriever_query(model, l, h, mode) if S_m >= cfg.K0 else None
    return retrieval.select(
        q, mem.ltm_keys[l], None if mem.pend_keys is None else mem.pend_keys[l], mem.ltm_ages[l],
        None if mem.pend_ages is None else mem.pend_ages[l], cfg.K0, score_mode=mode,
        order_mode=model.ltm_age_order, merged_age_dtype=mem.ltm_age_dtype[l],
    )


def ltm_pool(mem, l: int) -> torch.Tensor:
    return mem.ltm[l] if mem.pend_vals is None else torch.cat([mem.ltm[l], mem.pend_vals[l].to(mem.ltm[l].dtype)])


# ------------------------------------------------------------------------------- prefill / decode
@torch.no_grad()
def prefill(model, ids: torch.Tensor, use_memory: bool = True, fast: bool | None = None, record: list | None = None):
    """Memory-conditioned prefill (spec §7.2). Returns logits [T, vocab] fp32 and the KV cache
    (list of post-RoPE (k, v) [Hkv, P+T, Dh] per layer). ``record`` collects retrieved indices."""
    cfg, mem = model.config, model.memory
    fast = model.fast_path if fast is None else fast
    T = ids.shape[0]
    h = model.model.embed_tokens(ids.to(model.device))
    P = cfg.prefix_len if use_memory else 0
    cos, sin = model.rope_tables(torch.arange(P + T), h.dtype)
    mkv = model.memory_kv() if (use_memory and fast) else None
    cache = []
    for l in range(cfg.num_hidden_layers):
        idx = None
        if use_memory and cfg.is_mplus:
            idx = retrieve_indices(model, l, h)
            if record is not None:
                record.append(idx)
        if not use_memory:
            y, k, v = block_direct(model, l, h, 0, cos, sin, ADAPTER_GENERATE)
        elif fast:
            pk, pv = mkv.prefix(l, idx)
            pk = apply_rope(pk, cos[:P], sin[:P])
            y, k, v = block_with_prefix_kv(model, l, h, pk, pv, cos[P:], sin[P:], ADAPTER_GENERATE)
        else:
            parts = [model.bos_embedding[l].to(h.dtype)] if cfg.add_bos_embedding else []
            if idx is not None:
                parts.append(ltm_pool(mem, l)[idx].to(h.dtype))
            parts.append(mem.stm[l].to(h.dtype))
            y, k, v = block_direct(model, l, torch.cat(parts + [h]), P, cos, sin, ADAPTER_GENERATE)
        cache.append((k, v))
        h = y
    return model.logits(h), cache


@torch.no_grad()
def decode_step(model, tok: int, pos: int, cache: list) -> torch.Tensor:
    """One token at position ``pos`` over the cache (memory rows included as its first P rows)."""
    x = model.model.embed_tokens(torch.tensor([tok], device=model.device))
    cos, sin = model.rope_tables(torch.tensor([pos]), x.dtype)
    for l in range(model.config.num_hidden_layers):
        pk, pv = cache[l]
        x, k, v = block_with_prefix_kv(model, l, x, pk, pv, cos, sin, ADAPTER_GENERATE)
        cache[l] = (k, v)
    return model.logits(x)[0]
