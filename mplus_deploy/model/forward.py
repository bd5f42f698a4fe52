"""Explicit-tensor forward functions of M+ (gpt-fast style): the injection forward (spec §3.4),
memory-conditioned prefill with layer-interleaved retrieval (§6–§7.2) and the decode step.

Two equal paths for prefill:
- direct (faithful, default): per layer ``X = [bos, LTM_sel, STM, prompt]`` through the block;
- fast (spec §12 R1/R2): memory rows are K/V-only, so their pre-RoPE K/V are computed once per
  memory state (``MemoryKV``) and only rotated by slot position at use.

Memory is an argument (a ``MemoryState``, or for the graph-shaped functions its tensors), never read from
``model.memory``: the export references and the runtime's torch runner call these same functions on the
memory they are given (``update_forward``, ``select_rows``, ``prefill_with_prefix_kv``, ``decode_step``).
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
def memory_tail(mem) -> torch.Tensor | None:
    """The last K STM rows [L, K, d] an update conditions on; None for a MemoryLLM before its first update."""
    K, N = mem.cfg.K, mem.cfg.N
    return mem.stm[:, N - K:] if mem.initialized else None


@torch.no_grad()
def update_forward(model, ids: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """Spec §3.4 over the STM tail ``tail`` [L, K, d] (None: no memory prefix) → delta [L, K', d]
    (K' = K, or min(T, K) without a prefix)."""
    cfg = model.config
    K, T = cfg.K, ids.shape[0]
    h = model.model.embed_tokens(ids.to(model.device))
    nb = int(cfg.add_bos_embedding)
    if tail is not None:
        P = nb + min(T, K)  # prefix_token_length = min(nb + K, R - K)
        R = nb + K + T
    else:  # MemoryLLM before its first update: no memory prefix at all (cat_memory_and_hiddens)
        P, R = 0, T
    cos, sin = model.rope_tables(torch.arange(R), h.dtype)
    nme = model.new_memory_positional_emb.reshape(1, -1).to(h.dtype)
    deltas = []
    for l in range(cfg.num_hidden_layers):
        parts = []
        if tail is not None:
            if nb:
                parts.append(model.bos_embedding[l].to(h.dtype))
            parts.append(tail[l].to(h.dtype))
        X = torch.cat(parts + [h]) if parts else h.clone()
        X[-K:] = X[-K:] + nme
        y, _, _ = block_direct(model, l, X, P, cos, sin, ADAPTER_UPDATE)
        deltas.append(y[-K:])
        h = y[-T:]
    return torch.stack(deltas)


def inject_forward(model, mem, ids: torch.Tensor) -> torch.Tensor:
    """Spec §3.4 on memory ``mem`` → delta [L, K', d]; ``mem`` is read, not written."""
    return update_forward(model, ids, memory_tail(mem))


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


def select_rows(model, l: int, h: torch.Tensor, keys, pend_keys, ages, pend_ages,
                merged_age_dtype: str = "float64") -> torch.Tensor:
    """Indices into ``concat(merged, pending)`` of the K0 rows layer l attends to, in prefix order, for
    query rows ``h`` over merged ``keys``/``ages`` and the pending ones (None when there are none)."""
    mode, K0 = model.score_mode(), model.config.K0
    q = retriever_query(model, l, h, mode).to(keys.device) if keys.shape[0] >= K0 else None
    return retrieval.select(q, keys, pend_keys, ages, pend_ages, K0, score_mode=mode,
                            order_mode=model.ltm_age_order, merged_age_dtype=merged_age_dtype)


def retrieve_indices(model, mem, l: int, h: torch.Tensor) -> torch.Tensor:
    """``select_rows`` over layer l of memory ``mem``."""
    pk = None if mem.pend_keys is None else mem.pend_keys[l]
    pa = None if mem.pend_ages is None else mem.pend_ages[l]
    return select_rows(model, l, h, mem.ltm_keys[l], pk, mem.ltm_ages[l], pa, mem.ltm_age_dtype[l])


def ltm_pool(mem, l: int) -> torch.Tensor:
    return mem.ltm[l] if mem.pend_vals is None else torch.cat([mem.ltm[l], mem.pend_vals[l].to(mem.ltm[l].dtype)])


# ------------------------------------------------------------------------------- prefill / decode
def prefill_with_prefix_kv(model, ids: torch.Tensor, P: int, prefix_of):
    """The K/V fast path of prefill (R1/R2): per layer ``prefix_of(l, h)`` → the P memory rows' pre-RoPE
    (k, v) [Hkv, P, Dh], rotated to slots 0..P-1, then the prompt attends over them. Returns the last
    hidden rows [T, d] and the cache (post-RoPE (k, v) [Hkv, P+T, Dh] per layer)."""
    h = model.model.embed_tokens(ids.to(model.device))
    cos, sin = model.rope_tables(torch.arange(P + ids.shape[0]), h.dtype)
    cache = []
    for l in range(model.config.num_hidden_layers):
        pk, pv = prefix_of(l, h)
        pk = apply_rope(pk.to(h.dtype), cos[:P], sin[:P])
        h, k, v = block_with_prefix_kv(model, l, h, pk, pv.to(h.dtype), cos[P:], sin[P:], ADAPTER_GENERATE)
        cache.append((k, v))
    return h, cache


@torch.no_grad()
def prefill(model, mem, ids: torch.Tensor, use_memory: bool = True, fast: bool | None = None,
            record: list | None = None, observe=None):
    """Memory-conditioned prefill (spec §7.2) on memory ``mem``. Returns logits [T, vocab] fp32 and the KV
    cache (list of post-RoPE (k, v) [Hkv, P+T, Dh] per layer). ``record`` collects retrieved indices;
    ``observe(l, h)`` sees each layer's input rows before its retrieval (export validation: score margins)."""
    cfg = model.config
    fast = model.fast_path if fast is None else fast
    retrieve = use_memory and cfg.is_mplus

    def indices(l, h):
        if observe is not None and retrieve:
            observe(l, h)
        idx = retrieve_indices(model, mem, l, h) if retrieve else None
        if idx is not None and record is not None:
            record.append(idx)
        return idx

    if use_memory and fast:
        mkv = model.memory_kv(mem)
        h, cache = prefill_with_prefix_kv(model, ids, cfg.prefix_len, lambda l, h: mkv.prefix(l, indices(l, h)))
        return model.logits(h), cache
    T = ids.shape[0]
    h = model.model.embed_tokens(ids.to(model.device))
    P = cfg.prefix_len if use_memory else 0
    cos, sin = model.rope_tables(torch.arange(P + T), h.dtype)
    cache = []
    for l in range(cfg.num_hidden_layers):
        if not use_memory:
            y, k, v = block_direct(model, l, h, 0, cos, sin, ADAPTER_GENERATE)
        else:
            idx = indices(l, h)
            parts = [model.bos_embedding[l].to(h.dtype)] if cfg.add_bos_embedding else []
            if idx is not None:
                parts.append(ltm_pool(mem, l)[idx].to(h.dtype))
            parts.append(mem.stm[l].to(h.dtype))
            y, k, v = block_direct(model, l, torch.cat(parts + [h]), P, cos, sin, ADAPTER_GENERATE)
        cache.append((k, v))
        h = y
    return model.logits(h), cache


@torch.no_grad()
def decode_step(model, tok, pos, cache: list) -> torch.Tensor:
    """One token ``tok`` (int or 1-element tensor) at position ``pos`` over the cache (memory rows included
    as its first P rows); ``cache`` is updated in place. Returns logits [vocab] fp32."""
    tok = tok.reshape(1) if isinstance(tok, torch.Tensor) else torch.tensor([tok])
    pos = pos.reshape(1) if isinstance(pos, torch.Tensor) else torch.tensor([pos])
    x = model.model.embed_tokens(tok.to(model.device))
    cos, sin = model.rope_tables(pos, x.dtype)
    for l in range(model.config.num_hidden_layers):
        pk, pv = cache[l]
        x, k, v = block_with_prefix_kv(model, l, x, pk, pv, cos, sin, ADAPTER_GENERATE)
        cache[l] = (k, v)
    return model.logits(x)[0]
