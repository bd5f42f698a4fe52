"""Graph family ``prefill`` (spec §7.2, §12 R1/R2/R4; W_dec = ``decoder_adapter``).

Memory enters as pre-RoPE K/V (``memory_project`` output): memory rows are never re-projected per
query (exact rewrite R1/R2). Retrieval runs in-graph per layer (layer-interleaved, spec §13.1 hazard 6)
with ``retriever.select_indices``; the retrieved LTM K/V rows are gathered, the prefix
``[bos, LTM_sel, STM]`` is rotated by slot position (0, 1..K0, K0+1..K0+N) and the prompt attends over it.

Artifact format v3 (docs/graphs.md): the LTM arrives per layer (``ltm_keys.{l}``, ``ltm_k.{l}``,
``ltm_v.{l}``: views of the runtime's stacked store, ``artifact/graph_io.py``), so retrieval gathers K0 rows
from its own layer's input instead of first copying the layer out of an [L, ...] stack (2 x 0.68 GB per
layer at S = 165k in fp32); ``logit_rows`` [R] picks the prompt rows that get logits (generation: the last).
"""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_GENERATE
from mplus_deploy.model.memory_kv import packed_feeds, project_rows
from mplus_deploy.model.memory import MemoryState
from mplus_deploy.artifact.graph_io import LAYERED, all_rows, last_row

from .common import GraphSpec, IOSpec, LayerView, Limits, Rope, attn_blocks, causal_bias, lm_head_for_export, lm_logits
from .retrieval_margin import separate
from .retriever import score_chunks

NAME = "prefill"


class Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.is_mplus, self.K0, self.nb = cfg.is_mplus, cfg.K0, int(cfg.add_bos_embedding)
        self.chunks = score_chunks(cfg) if cfg.is_mplus else 1
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(LayerView(layer) for layer in model.model.layers)
        qb = attn_blocks(cfg.num_attention_heads // cfg.num_key_value_heads, cfg.max_window, cfg.prefix_len + cfg.max_window)
        for layer in self.layers:
            layer.q_blocks = qb
        self.norm = model.model.norm
        self.lm_head = lm_head_for_export(model)
        if self.nb:
            self.bos_embedding = model.bos_embedding
        self.rope = Rope(model)

    def forward(self, ids, logit_rows, stm_k, stm_v, *ltm_in):
        """``ltm_in`` (M+): per layer ``ltm_keys.{l}, ltm_k.{l}, ltm_v.{l}``, then ``ltm_ages, valid_len, merged_len``."""
        h = self.embed_tokens(ids)
        dt = h.dtype
        P = self.nb + self.K0 + stm_k.shape[2]
        cos, sin = self.rope(torch.arange(P + ids.shape[0]))
        cos_p, sin_p, cos_q, sin_q = cos[:P], sin[:P], cos[P:], sin[P:]
        present_k, present_v, retrieved = [], [], []
        bias = causal_bias(ids.shape[0], P + ids.shape[0], dt)  # once for every layer
        for l, layer in enumerate(self.layers):
            bos = self.bos_embedding[l].to(dt) if self.nb else None
            ltm = ()
            if self.is_mplus:
                ltm_ages, valid_len, merged_len = ltm_in[-3:]
                ltm = (*ltm_in[3 * l: 3 * l + 3], ltm_ages[l], valid_len[l], merged_len[l])
            o = layer("prefill", h, bos, stm_k[l], stm_v[l], ltm, cos_p, sin_p, cos_q, sin_q, ADAPTER_GENERATE, self.K0,
                      self.chunks, bias)
            h = o[0]
            present_k.append(o[1])
            present_v.append(o[2])
            if self.is_mplus:
                retrieved.append(o[3])
        logits = lm_logits(self.norm, self.lm_head, self.embed_tokens, torch.index_select(h, 0, logit_rows))
        outs = (logits, torch.stack(present_k), torch.stack(present_v))
        return outs + (torch.stack(retrieved),) if self.is_mplus else outs


def spec(cfg, limits: Limits) -> GraphSpec:
    L, Hkv, Dh, N, V = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.N, cfg.vocab_size
    ins = [IOSpec("ids", ["T"], "int64"), IOSpec("logit_rows", ["R"], "int64"),
           IOSpec("stm_k", [L, Hkv, N, Dh], "float"), IOSpec("stm_v", [L, Hkv, N, Dh], "float")]
    outs = [IOSpec("logits", ["R", V], "float32"), IOSpec("present_k", [L, Hkv, "P+T", Dh], "float"),
            IOSpec("present_v", [L, Hkv, "P+T", Dh], "float")]
    dims = {"T": (1, min(16, limits.max_prompt), limits.max_prompt), "R": (1, 1, limits.max_prompt)}
    if cfg.is_mplus:
        dr, K0 = cfg.selector_hidden_dim, cfg.K0
        shape = {"ltm_keys": ["S", dr], "ltm_k": [Hkv, "S", Dh], "ltm_v": [Hkv, "S", Dh]}
        ins += [IOSpec(f"{n}.{l}", shape[n], "float") for l in range(L) for n in LAYERED]
        ins += [IOSpec("ltm_ages", [L, "S"], "int64"), IOSpec("valid_len", [L], "int64"), IOSpec("merged_len", [L], "int64")]
        outs.append(IOSpec("retrieved", [L, K0], "int64"))
        dims["S"] = (K0, max(K0, cfg.ltm_initial_size), max(K0, limits.max_ltm))
    return GraphSpec(name=NAME, inputs=ins, outputs=outs, dims=dims, adapter=ADAPTER_GENERATE,
                     notes=f"spec §7.2; P = {cfg.prefix_len}; retrieval in-graph per layer; LTM inputs per layer "
                           "(ltm_keys.{l}, ltm_k.{l}, ltm_v.{l}); logits of the prompt rows listed in logit_rows",
                     extra={"prefix_len": cfg.prefix_len})


# ------------------------------------------------------------------------------------ feeds
@torch.no_grad()
def random_memory(model, g: torch.Generator, S_m: int, n_p: int) -> MemoryState:
    """A random memory state with S_m merged and n_p pending LTM rows per layer (ages with ties).

    Rows are drawn at random (with replacement) from the model's own memory rows of that layer, plus
    1% noise: random inputs, never zeros, but on the model's real activation distribution. Pure N(0, 1)
    rows put a real backbone (demo: SmolLM2, with large activation outliers) off-distribution, where
    its fp32 logits move by ~2e-4 x scale between fp32 and fp64 *in torch itself*: a tolerance of
    1e-4 x scale would then test rounding noise, not the export (measured, docs/design-export.md).
    """
    import dataclasses

    cfg = model.config
    own = model.memory
    # a new state that shares nothing it will replace: cloning the model's whole LTM (150k rows at real width)
    # only to overwrite it cost a copy of the memory per validation case
    mem = dataclasses.replace(own, stm_ages=own.stm_ages.clone(), ltm_age_dtype=list(own.ltm_age_dtype),
                              generator=torch.Generator(device="cpu"))
    L, N, d, dt = cfg.num_hidden_layers, cfg.N, cfg.hidden_size, model.dtype

    def pool_of(l: int) -> list:
        return [own.stm[l]] + ([own.ltm[l]] if cfg.is_mplus and own.ltm[l].shape[0] else [])

    def rows_at(parts: list, idx: torch.Tensor) -> torch.Tensor:
        out, base = torch.empty(idx.shape[0], d), 0
        for p in parts:  # no concatenated copy of the pool
            m = (idx >= base) & (idx < base + p.shape[0])
            out[m] = p[idx[m] - base].float()
            base += p.shape[0]
        return out

    def draw(l: int, n: int) -> torch.Tensor:
        parts = pool_of(l)
        total = sum(p.shape[0] for p in parts)
        sample = rows_at(parts, torch.randint(0, total, (min(total, 4096),), generator=g))  # per-channel spread
        # distinct source rows where the pool allows: near-copies of one row (drawn twice, 1% noise apart) score
        # almost alike, and one of them on each side of the top-K0 cut let the last bits of the summation order
        # (another CPU's kernels) decide which one is retrieved (the demo's export failed validation on AMD EPYC)
        pick = torch.randperm(total, generator=g)[:n] if n <= total else torch.randint(0, total, (n,), generator=g)
        rows = rows_at(parts, pick)
        noise = torch.randn(n, d, generator=g) * (0.01 * sample.std(dim=0, keepdim=True) + 1e-3)
        return (rows + noise).to(dt)

    mem.stm = torch.stack([draw(l, N) for l in range(L)])
    if cfg.is_mplus:
        mem.ltm = [draw(l, S_m) for l in range(L)]
        mem.ltm_keys = list(model.retriever_keys(torch.stack(mem.ltm))) if S_m else [torch.zeros(0, cfg.selector_hidden_dim, dtype=dt)] * L
        mem.ltm_ages = [torch.randint(0, 3 * cfg.K, (S_m,), generator=g).to(torch.float64) for _ in range(L)]
        mem.ltm_rf = [torch.full((S_m,), 10.0, dtype=torch.float64) for _ in range(L)]
        if n_p:
            mem.pend_vals = torch.stack([draw(l, n_p) for l in range(L)])
            mem.pend_keys = model.retriever_keys(mem.pend_vals)
            mem.pend_ages = torch.randint(0, cfg.K, (L, n_p), generator=g).to(torch.float64)
        else:
            mem.pend_vals = mem.pend_keys = mem.pend_ages = None
    mem.touch()
    return mem


def validation_cases(cfg, limits: Limits) -> list[tuple]:
    K0, K = cfg.K0, cfg.K
    if not cfg.is_mplus:
        return [(5, 0, 0), (min(11, limits.max_prompt), 0, 0)]
    # (T, merged, pending): top-k with pending; cyclic with pending present (ignored); exactly K0.
    # logit rows: all of them in the first case of each kind, the last row (generation) in the others.
    return [(5, K0 + 5, K), (min(11, limits.max_prompt), max(1, K0 // 3), K), (1, K0, 0)]


def sample(model, g: torch.Generator, case: tuple) -> tuple[dict, MemoryState]:
    T, S_m, n_p = case
    mem = random_memory(model, g, S_m, n_p)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=g)
    if model.config.is_mplus:
        separate(model, mem, ids)  # a clear top-K0 cut per layer (export/retrieval_margin.py)
    feeds = {"ids": ids, "logit_rows": all_rows(ids) if T == 5 else last_row(ids)}
    feeds.update(packed_feeds(model.config, mem, lambda rows: project_rows(model, rows)))
    return feeds, mem


@torch.no_grad()
def reference(model, feeds: dict, mem: MemoryState) -> dict:
    rec: list = []
    logits, cache = F_.prefill(model, mem, feeds["ids"], record=rec)
    out = {"logits": logits[feeds.get("logit_rows", all_rows(feeds["ids"]))], "present_k": torch.stack([k for k, _ in cache]), "present_v": torch.stack([v for _, v in cache])}
    if model.config.is_mplus:
        out["retrieved"] = torch.stack(rec)
    return out
