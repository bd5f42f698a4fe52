"""Graph family ``retriever`` and the in-graph retrieval used by ``prefill`` (spec §6, §11.2, §11.3).

Semantics = ``mplus_deploy.model.retrieval.select`` in standard ONNX ops (no custom op, so plain ORT
and the TensorRT-RTX parser take it):

- scores ``mean_T sigmoid(q @ keys^T)`` in fp32, computed as ``sigmoid(keys @ q^T)`` [S, T] and averaged
  along its contiguous last axis (MatMul, Sigmoid, ReduceMean; the same math), rows >= ``valid_len`` masked to
  -inf (Where); the keys are cut into ``score_chunks`` row blocks (their sizes computed in-graph from S) so
  that the [T, S] matrix is never alive whole (R7; 1.35 GB at T = 2,048, S = 165k) and, from 16k keys on,
  so that one block's scores stay near the cache (issue 16: 4 blocks took the T = 512 query over 17k keys
  from 106.7 to 98.9 ms, T = 64 unchanged; bench/RESULTS.md);
- ``TopK(K0)`` (ONNX tie rule: higher score, then lower index; TensorRT allows K0 <= 3840), then the
  set sorted ascending (``TopK(largest=0)``);
- small-LTM branch (``merged_len < K0``): cyclic fill ``(i + K0*(m-1)) mod m`` = the last K0 entries of
  ``arange(m)`` tiled (pending rows ignored, as the official code), picked with Where;
- oldest-first order, ties by descending position: ``TopK(largest=1)`` over the unique int64 key
  ``age * K0 + position`` (= stable argsort of the ages, reversed).
"""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model import retrieval
from mplus_deploy.model.forward import retriever_query

from .common import GraphSpec, IOSpec, Limits

NAME = "retriever"
SCORE_BLOCK_BYTES = 128 << 20  # fp32 bytes of one [T, S / chunks] score block at the largest T and S
MAX_SCORE_CHUNKS = 16
CACHE_CHUNK_KEYS = 4096  # the fewest keys a block cut for the cache (not for memory) holds
CACHE_CHUNKS = 4  # blocks cut for the cache once S_max allows CACHE_CHUNK_KEYS each


def score_chunks(cfg, limits: Limits | None = None) -> int:
    """Row blocks of the keys: enough that one block's T_max x S_max / blocks fp32 scores stay under
    ``SCORE_BLOCK_BYTES`` (memory), and at least ``CACHE_CHUNKS`` when S_max holds that many blocks of
    ``CACHE_CHUNK_KEYS`` keys (cache; 1 for small LTMs)."""
    limits = limits or Limits.from_config(cfg)
    S = max(cfg.K0, limits.max_ltm)
    memory = -(-4 * limits.max_prompt * S // SCORE_BLOCK_BYTES)
    cache = min(CACHE_CHUNKS, S // CACHE_CHUNK_KEYS)
    return int(min(MAX_SCORE_CHUNKS, max(1, memory, cache)))


def _block_scores(qT: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(torch.matmul(keys.float(), qT)).mean(1)  # [S_block, T], averaged along T (contiguous)


def mean_sigmoid(q: torch.Tensor, keys: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """``mean_T sigmoid(q @ keys^T)`` [S] in fp32 as ``mean(sigmoid(keys @ q^T), 1)``, in ``chunks`` row blocks
    of ceil(S / chunks) keys (each key is scored exactly as unchunked; trailing blocks may be empty)."""
    qT = q.float().transpose(0, 1)
    if chunks == 1:
        return _block_scores(qT, keys)
    S = keys.shape[0]
    c = (S + chunks - 1) // chunks
    return torch.cat([_block_scores(qT, keys[i * c:(i + 1) * c]) for i in range(chunks)])


def select_indices(q: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, valid_len: torch.Tensor,
                   merged_len: torch.Tensor, K0: int, chunks: int = 1) -> torch.Tensor:
    """q [T, d_r], keys [S, d_r] (S >= K0), ages [S] int64, valid_len/merged_len [] int64 → indices [K0]."""
    scores = mean_sigmoid(q, keys, chunks)
    j = torch.arange(keys.shape[0])
    scores = torch.where(j < valid_len, scores, torch.full_like(scores, float("-inf")))
    top = torch.topk(scores, K0).indices
    top = torch.topk(top, K0, largest=False).values  # ascending index order (spec §6.1 step 4)
    m = torch.clamp(merged_len, min=1)
    i = torch.arange(K0)
    cyc = torch.remainder(i + K0 * (m - 1), m)
    idx = torch.where(merged_len < K0, cyc, top)
    key = torch.gather(ages, 0, idx) * K0 + i
    order = torch.topk(key, K0).indices  # age descending, ties by descending position
    return torch.gather(idx, 0, order)


class Retriever(nn.Module):
    """Standalone per-layer scoring: the per-layer ``input_layernorm`` and ``query_proj`` weights are
    stacked and picked by the ``layer`` input (one graph for all layers)."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.K0, self.n_layers = cfg.K0, cfg.num_hidden_layers
        self.chunks = score_chunks(cfg)
        self.retrieval_op = "standard"  # or "plugin" (``plugin_nodes``; set by the exporter)
        layers = model.model.layers
        self.eps = layers[0].input_layernorm.eps
        self.ln = nn.Parameter(torch.stack([la.input_layernorm.weight for la in layers]).clone(), requires_grad=False)
        self.w1 = nn.Parameter(torch.stack([la.self_attn.query_proj[0].weight for la in layers]).clone(), requires_grad=False)
        self.w2 = nn.Parameter(torch.stack([la.self_attn.query_proj[2].weight for la in layers]).clone(), requires_grad=False)

    def derived_weights(self, prefix: str = "") -> dict:
        """Each stacked parameter: (dedupe key, producer stacking the official per-layer tensors)."""
        L = range(self.n_layers)
        keys = {"ln": [f"model.layers.{l}.input_layernorm.weight" for l in L],
                "w1": [f"model.layers.{l}.self_attn.query_proj.0.weight" for l in L],
                "w2": [f"model.layers.{l}.self_attn.query_proj.2.weight" for l in L]}
        return {prefix + n: ("stack:" + ",".join(ks), lambda src, dtype, ks=ks: torch.stack([src.get(k, dtype) for k in ks]))
                for n, ks in keys.items()}

    def forward(self, layer, h, ltm_keys, ltm_ages, valid_len, merged_len):
        dt = h.dtype
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        x = self.ln[layer] * x.to(dt)
        x = torch.nn.functional.silu(torch.matmul(x, self.w1[layer].transpose(0, 1)))
        q = torch.matmul(x, self.w2[layer].transpose(0, 1))
        from .plugin_nodes import select

        return select(self.retrieval_op, q, ltm_keys, ltm_ages, valid_len, merged_len, self.K0, self.chunks)


def spec(cfg, limits: Limits) -> GraphSpec:
    d, dr, K0 = cfg.hidden_size, cfg.selector_hidden_dim, cfg.K0
    return GraphSpec(
        name=NAME,
        inputs=[IOSpec("layer", [], "int64"), IOSpec("h", ["T", d], "float"), IOSpec("ltm_keys", ["S", dr], "float"),
                IOSpec("ltm_ages", ["S"], "int64"), IOSpec("valid_len", [], "int64"), IOSpec("merged_len", [], "int64")],
        outputs=[IOSpec("indices", [K0], "int64")],
        dims={"T": (1, min(16, limits.max_prompt), limits.max_prompt), "S": (K0, max(K0, cfg.ltm_initial_size), max(K0, limits.max_ltm))},
        adapter=None, notes="spec §6; indices into merged+pending rows, prefix order (oldest first)",
    )


def random_ltm(cfg, g: torch.Generator, S_m: int, n_p: int, pad: int, dtype):
    """Random keys/ages for one layer: merged rows, pending rows, pad rows; ages with ties."""
    S = S_m + n_p + pad
    keys = torch.randn(S, cfg.selector_hidden_dim, generator=g).to(dtype)
    ages = torch.randint(0, 3 * cfg.K, (S,), generator=g)
    return keys, ages


def sample(cfg, g: torch.Generator, case: tuple, dtype) -> dict:
    T, S_m, n_p, pad, layer = case
    keys, ages = random_ltm(cfg, g, S_m, n_p, max(pad, cfg.K0 - S_m - n_p), dtype)
    return {"layer": torch.tensor(layer, dtype=torch.int64), "h": torch.randn(T, cfg.hidden_size, generator=g).to(dtype),
            "ltm_keys": keys, "ltm_ages": ages, "valid_len": torch.tensor(S_m + n_p), "merged_len": torch.tensor(S_m)}


def validation_cases(cfg, limits: Limits) -> list[tuple]:
    K0, L = cfg.K0, cfg.num_hidden_layers
    # (T, merged, pending, pad, layer): top-k with pending + pads; exactly K0 merged; cyclic (pending ignored)
    return [(5, K0 + 7, cfg.K, 3, L - 1), (1, K0, 0, 0, 0), (3, max(1, K0 // 3), cfg.K, 2, L - 1)]


@torch.no_grad()
def reference(model, feeds: dict) -> dict:
    l = int(feeds["layer"])
    S_m, valid = int(feeds["merged_len"]), int(feeds["valid_len"])
    keys, ages = feeds["ltm_keys"], feeds["ltm_ages"].to(torch.float64)
    q = retriever_query(model, l, feeds["h"].to(model.dtype), "fp32") if S_m >= model.config.K0 else None
    n_p = valid - S_m
    idx = retrieval.select(q, keys[:S_m], keys[S_m:valid] if n_p else None, ages[:S_m], ages[S_m:valid] if n_p else None,
                           model.config.K0, score_mode="fp32")
    return {"indices": idx}
