"""Shared pieces of the graph wrappers: graph/IO specs, export-friendly RoPE and attention (one KV head at
a time), ``LayerView``, the lm_head forms (tied, row blocks). Tracing and node names: ``trace.py``.

Every graph family module (``memory_update``, ``memory_project``, ``retriever``, ``prefill``,
``decode``) builds a small ``nn.Module`` over the reference modules of ``mplus_deploy.model`` and
describes its I/O with a :class:`GraphSpec` (docs/graphs.md is the contract).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mplus_deploy.model.rope import rotate_half

TORCHSCRIPT_MAX_OPSET = 20
DEFAULT_OPSET = 21
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# --precision → (weight storage, traced compute and graph float I/O). bf16: bf16 bytes, fp32 math (ORT's CPU
# EP has no bf16 kernels; a bf16 value is exact in fp32, so it computes what fp32 weights would).
IO_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bf16": "fp32"}


# ------------------------------------------------------------------------------------ specs
@dataclass
class IOSpec:
    name: str
    shape: list  # ints and dim names
    dtype: str  # "float" (= artifact precision), "float32", "int64"

    def resolved_dtype(self, precision: str) -> str:
        if self.dtype == "float":
            return {"fp32": "float32", "fp16": "float16"}[IO_PRECISION[precision]]
        return self.dtype


@dataclass
class GraphSpec:
    name: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    dims: dict[str, tuple[int, int, int]]  # dim name -> (min, opt, max)
    adapter: str | None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def dynamic_axes(self) -> dict:
        out = {}
        for io in self.inputs + self.outputs:
            ax = {i: d for i, d in enumerate(io.shape) if isinstance(d, str)}
            if ax:
                out[io.name] = ax
        return out

    def to_manifest(self, precision: str, file: str, opset: int) -> dict:
        io = lambda x: {"name": x.name, "shape": list(x.shape), "dtype": x.resolved_dtype(precision)}  # noqa: E731
        return {
            "file": file, "adapter": self.adapter, "precision": precision, "opset": opset,
            "inputs": [io(x) for x in self.inputs], "outputs": [io(x) for x in self.outputs],
            "dynamic_dims": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.dims.items()},
            "notes": self.notes, **self.extra,
        }


@dataclass
class Limits:
    """Dynamic-dimension ranges of the exported graphs (recorded in the manifest, used for TRT profiles)."""

    max_chunk: int
    max_prompt: int
    max_ltm: int  # S_max: padded LTM rows (merged + pending) per layer
    max_rows: int  # memory_project rows per call
    max_batch: int = 16  # decode_batch sequences per call (issue 19)

    @classmethod
    def from_config(cls, cfg, max_chunk: int | None = None, max_prompt: int | None = None,
                    max_batch: int | None = None) -> "Limits":
        mc = int(max_chunk or cfg.max_chunk)
        mp = int(max_prompt or cfg.max_window)
        mb = int(max_batch or cls.max_batch)
        if mb < 1:
            raise ValueError(f"--max-batch {mb} must be >= 1")
        if mc < cfg.K:
            raise ValueError(f"--max-chunk {mc} must be >= num_tokens K={cfg.K} (memory_update covers K <= T <= max_chunk)")
        if mp < 1 or mp > cfg.max_window:
            raise ValueError(f"--max-prompt {mp} must lie in [1, max_window={cfg.max_window}]")
        # LTM steady state (spec §5.4): rows live ceil(RF0/DEC) merges of F*K rows, plus the initial rows
        # and up to F*K pending rows.
        if cfg.is_mplus:
            F, K = cfg.update_ltm_frequency, cfg.K
            life = math.ceil(float(cfg.initial_rf_when_moving_stm_to_ltm) / max(float(cfg.decay_frequency), 1e-9))
            s_max = max(cfg.ltm_initial_size, cfg.K0) + (life + 1) * F * K
        else:
            s_max = 0
        return cls(max_chunk=mc, max_prompt=mp, max_ltm=s_max, max_rows=max(cfg.N, s_max), max_batch=mb)


# ------------------------------------------------------------------------------------ math
class Rope(nn.Module):
    """cos/sin tables for int64 positions, computed in-graph in fp32 (spec §11.1), cast to the model dtype."""

    def __init__(self, model):
        super().__init__()
        model.rope_tables(torch.arange(1), model.dtype)  # resolves the inv_freq mode the reference uses
        _, inv, pos_div = model._rope
        self.register_buffer("inv_freq", inv.float().clone(), persistent=False)
        self.pos_div = float(pos_div)
        self.dtype = model.dtype

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = pos.to(torch.float32)
        if self.pos_div != 1.0:
            p = p / self.pos_div
        ang = p[:, None] * self.inv_freq[None, :]
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


ATTN_BLOCK_BYTES = 128 << 20  # fp32 bytes of one [g, Q / blocks, R] score block at the largest Q and R
MAX_ATTN_BLOCKS = 8


def attn_blocks(g: int, max_q: int, max_r: int) -> int:
    """Query-row blocks of ``attend``: 1 unless one KV head's [g, Q, R] fp32 scores exceed ``ATTN_BLOCK_BYTES``."""
    return int(min(MAX_ATTN_BLOCKS, max(1, -(-4 * g * max_q * max_r // ATTN_BLOCK_BYTES))))


def causal_bias(Q, R, dtype) -> torch.Tensor:
    """The bottom-right-aligned causal mask of ``Q`` query rows over ``R`` keys as an additive [Q, R] bias
    (0 where query i sees key j <= R-Q+i, -inf elsewhere). Added to the scores it gives exactly the masked
    scores (x + 0 == x, x + -inf == -inf), and ORT runs the broadcast Add 5-7x faster than a broadcast Where;
    a graph builds it once and every layer adds it (issue 16)."""
    i = torch.arange(Q)[:, None]
    j = torch.arange(R)[None, :]
    return torch.zeros(Q, R, dtype=dtype).masked_fill(j > (R - Q) + i, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv: int, q_blocks: int = 1,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``layers.attend`` in export-friendly form, one KV head at a time: GQA by reading KV head h for its g
    query heads ([g, Q, Dh] x [Dh, R]) instead of ``repeat_interleave``; bottom-right-aligned causal mask built
    from shapes; the 1/sqrt(Dh) scale applied to q. Per KV head, so the [Q, R] score blocks of one head
    group are alive at a time: a 2,047-token prompt over a 12,801-row memory prefix has 3.9 GB of fp32
    scores per layer at mplus-8b (measured: 20 GB peak RSS in ORT with all heads at once), 0.49 GB per
    KV head. ``q_blocks`` > 1 also cuts the query rows into that many blocks of ceil(Q / q_blocks) rows
    (sizes computed in-graph from the dynamic Q; trailing blocks may be empty): each row's scores, mask and
    softmax are exactly those of the unblocked form."""
    H, Dh = q.shape[0], q.shape[-1]
    g = H // n_kv
    qg = (q * (1.0 / math.sqrt(Dh))).reshape(n_kv, g, -1, Dh)
    Q, R = q.shape[1], k.shape[1]
    if bias is None:
        bias = causal_bias(Q, R, q.dtype)
    c = (Q + q_blocks - 1) // q_blocks if q_blocks > 1 else Q

    def head_rows(qh, kh, vh, a, b):
        mask = bias if q_blocks == 1 else bias[a:b]
        qh = qh if q_blocks == 1 else qh[:, a:b]
        scores = torch.matmul(qh, kh.transpose(0, 1)) + mask  # [g, rows, R]
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(p, vh)  # [g, rows, Dh]

    outs = []
    for h in range(n_kv):
        if q_blocks == 1:
            outs.append(head_rows(qg[h], k[h], v[h], 0, Q))
        else:
            outs.append(torch.cat([head_rows(qg[h], k[h], v[h], i * c, (i + 1) * c) for i in range(q_blocks)], dim=1))
    o = torch.stack(outs)  # [Hkv, g, Q, Dh]
    return o.reshape(H, -1, Dh).transpose(0, 1).reshape(-1, H * Dh)


def attend_split(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 n_kv: int) -> torch.Tensor:
    """``attend`` for one query row over two key blocks that are never concatenated: the read-only
    prefix ``pk``/``pv`` [Hkv, P, Dh] and the tail ``k``/``v`` [Hkv, R, Dh] (ending with the query's own
    row). The scores of both blocks are concatenated along the key axis (small: [Hkv, g, P+R]) for one
    fp32 softmax; the probabilities are split at P and the two products summed. One query row at the end
    of the keys sees every key: no causal mask. GQA: with Q = 1 the g query heads of a KV head are the g
    rows of one [g, Dh] x [Dh, P] product, so the cache is used as stored ([Hkv, P, Dh], no Unsqueeze that
    ORT could materialize as a copy of the cache)."""
    H, Dh = q.shape[0], q.shape[-1]
    g = H // n_kv
    qg = q.reshape(n_kv, g, Dh)  # Q = 1: the g query heads of a KV head are the rows of one product
    s_p = torch.matmul(qg, pk.transpose(-1, -2))  # [Hkv, g, P]
    s_t = torch.matmul(qg, k.transpose(-1, -2))  # [Hkv, g, R]
    scores = torch.cat([s_p, s_t], dim=-1) * (1.0 / math.sqrt(Dh))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    P = pk.shape[1]
    o = torch.matmul(p[..., :P], pv) + torch.matmul(p[..., P:], v)  # [Hkv, g, Dh]
    return o.reshape(1, H * Dh)


class _Scope(nn.Module):
    """A named call scope (node names ``/layers.3/retrieval/TopK``) around a LayerView step."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class LayerView(nn.Module):
    """The reference modules of one decoder layer, registered under their official names. A wrapper calls
    each layer once (``layer("prefill", ...)``) so the exporter pushes one layer scope and node names read
    ``/layers.3/q_proj/base_layer/MatMul``, ``/layers.3/retrieval/TopK``."""

    def __init__(self, layer):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.retrieval = _Scope(self._retrieve)
        self.bos = _Scope(self._kv)
        self.q_blocks = 1  # attention query-row blocks (``attn_blocks``; set by the graph wrapper)
        self.retrieval_op = "standard"  # or "plugin" (``plugin_nodes``; set by the exporter)

    def forward(self, op: str, *args):
        return getattr(self, op)(*args)

    # ------------------------------------------------------------------ steps
    def tail(self, x_q: torch.Tensor, attn_out: torch.Tensor, adapter: str | None) -> torch.Tensor:
        """Residual + o_proj (no LoRA) + post-norm SwiGLU MLP on the query rows (``layers.layer_tail``)."""
        r = x_q + self.self_attn.o_proj(attn_out)
        return r + self.mlp(self.post_attention_layernorm(r), adapter)

    def _kv(self, rows, adapter):
        return self.self_attn.kv(self.input_layernorm(rows), adapter)

    def _retrieve(self, h, keys, ages, valid_len, merged_len, K0: int, chunks: int):
        """Retriever query f_q(input_layernorm(h)) [T, d_r] (spec §6.1 step 1) → K0 indices, prefix order."""
        from .plugin_nodes import select

        q = self.self_attn.query_proj(self.input_layernorm(h))
        return select(self.retrieval_op, q, keys, ages, valid_len, merged_len, K0, chunks)

    # ------------------------------------------------------------------ ops (one call per layer)
    def direct(self, X, xq, Q, cos, sin, adapter, bias=None):
        """``forward.block_direct`` with the last ``Q`` rows of ``X`` as queries (``xq`` = those rows);
        ``bias``: their ``causal_bias`` (built here when not given)."""
        att = self.self_attn
        xn = self.input_layernorm(X)
        R = X.shape[0]
        q = rope(att.q(xn[R - Q:], adapter), cos[R - Q:], sin[R - Q:])
        k, v = att.kv(xn, adapter)
        return self.tail(xq, attend(q, rope(k, cos, sin), v, att.Hkv, bias=bias), adapter)

    def _q_and_grown_kv(self, h, pk, pv, cos_q, sin_q, adapter):
        """Rotated queries of rows ``h`` and the K/V ``pk``/``pv`` grown by their (rotated) keys and values."""
        att = self.self_attn
        xn = self.input_layernorm(h)
        q = rope(att.q(xn, adapter), cos_q, sin_q)
        k, v = att.kv(xn, adapter)
        return q, torch.cat([pk, rope(k, cos_q, sin_q)], dim=1), torch.cat([pv, v], dim=1)

    def over_prefix(self, h, pk, pv, cos_q, sin_q, adapter, bias=None):
        """``forward.block_with_prefix_kv``: query rows ``h`` over post-RoPE prefix K/V."""
        q, k, v = self._q_and_grown_kv(h, pk, pv, cos_q, sin_q, adapter)
        return self.tail(h, attend(q, k, v, self.self_attn.Hkv, self.q_blocks, bias), adapter), k, v

    def over_split_prefix(self, h, pk, pv, past_k, past_v, cos_q, sin_q, adapter):
        """One decode row ``h`` [1, d] over the read-only post-RoPE prefix ``pk``/``pv`` [Hkv, P, Dh] and the
        tail ``past_k``/``past_v`` [Hkv, C, Dh] (``attend_split``: the prefix is never copied). Returns
        y and the tail grown by the new row, [Hkv, C+1, Dh]."""
        q, k, v = self._q_and_grown_kv(h, past_k, past_v, cos_q, sin_q, adapter)
        return self.tail(h, attend_split(q, pk, pv, k, v, self.self_attn.Hkv), adapter), k, v

    def step_batched(self, x, pk, pv, tk, tv, valid, cos, sin, adapter, P: int):
        """``decode_batch``'s layer: B decode rows, each over its own prefix and masked tail (``decode_batch``)."""
        from .decode_batch import step_layer

        return step_layer(self, x, pk, pv, tk, tv, valid, cos, sin, adapter, P)

    def project(self, rows, adapter, with_keys: bool):
        """Pre-RoPE K/V of memory rows (R1) and, for M+, their retriever keys f_k (spec §5.1)."""
        xn = self.input_layernorm(rows)
        k, v = self.self_attn.kv(xn, adapter)
        return (self.self_attn.key_proj(xn), k, v) if with_keys else (k, v)

    def prefill(self, h, bos_row, stm_k, stm_v, ltm, cos_p, sin_p, cos_q, sin_q, adapter, K0: int, chunks: int = 1,
                bias=None):
        """One prefill layer: [bos K/V, retrieved LTM K/V, STM K/V] rotated by slot, then the prompt block.
        ``ltm`` = (keys, k, v, ages, valid_len, merged_len) of this layer, or () for MemoryLLM."""
        pk, pv = [], []
        if bos_row is not None:
            bk, bv = self.bos(bos_row, adapter)
            pk.append(bk)
            pv.append(bv)
        idx = None
        if ltm:
            keys, lk, lv, ages, valid_len, merged_len = ltm
            from .plugin_nodes import gather

            idx = self.retrieval(h, keys, ages, valid_len, merged_len, K0, chunks)
            pk.append(gather(self.retrieval_op, lk, idx, 1))
            pv.append(gather(self.retrieval_op, lv, idx, 1))
        pk.append(stm_k)
        pv.append(stm_v)
        pk_rot = rope(torch.cat(pk, dim=1), cos_p, sin_p)
        y, k, v = self.over_prefix(h, pk_rot, torch.cat(pv, dim=1), cos_q, sin_q, adapter, bias)
        return (y, k, v, idx) if idx is not None else (y, k, v)


LM_HEAD_CHUNK_BYTES = 256 << 20  # fp32 bytes of one lm_head block (the largest weight temporary at run time)


class ChunkedLinear(nn.Module):
    """A large untied ``lm_head`` as row blocks of at most ``LM_HEAD_CHUNK_BYTES`` (in fp32), concatenated
    along the vocabulary. Same products, same order; but a bf16-storage graph casts one block at a time
    (128256 x 4096 at once would be a 2 GiB fp32 temporary per call). Parameters ``chunks.{i}`` are rows of
    the official ``lm_head.weight`` (``derived_weights``)."""

    def __init__(self, weight: torch.Tensor, key: str = "lm_head.weight"):
        super().__init__()
        V, d = weight.shape
        rows = max(1, LM_HEAD_CHUNK_BYTES // (4 * d))
        self.bounds = [(a, min(V, a + rows)) for a in range(0, V, rows)]
        self.key = key
        self.chunks = nn.ParameterList([nn.Parameter(weight[a:b], requires_grad=False) for a, b in self.bounds])

    @staticmethod
    def wanted(weight: torch.Tensor) -> bool:
        return weight.shape[0] * weight.shape[1] * 4 > LM_HEAD_CHUNK_BYTES

    def derived_weights(self, prefix: str) -> dict:
        return {f"{prefix}chunks.{i}": (f"rows:{self.key}:{a}:{b}", lambda src, dtype, a=a, b=b: src.get_rows(self.key, a, b, dtype))
                for i, (a, b) in enumerate(self.bounds)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.linear(x, w) for w in self.chunks], dim=-1)


def lm_head_for_export(model) -> nn.Module:
    """The model's ``lm_head``, or its :class:`ChunkedLinear` form when untied and large."""
    w = model.lm_head.weight
    if w is model.model.embed_tokens.weight or not ChunkedLinear.wanted(w):
        return model.lm_head
    return ChunkedLinear(w)


def derived_weights(wrapper: nn.Module) -> dict:
    """Parameters of ``wrapper`` that are not checkpoint tensors: name → (dedupe key, producer(source, dtype)), from
    every submodule with a ``derived_weights(prefix)`` (stacked retriever weights, lm_head row blocks)."""
    out = {}
    for name, mod in wrapper.named_modules():
        if hasattr(mod, "derived_weights"):
            out.update(mod.derived_weights(f"{name}." if name else ""))
    return out


def lm_logits(norm, lm_head, embed_tokens, h):
    """norm → lm_head → fp32. With tied embeddings the product is written ``(W @ h^T)^T`` so the exporter
    cannot constant-fold a transposed copy of the embedding (one copy on disk, docs/design-export.md)."""
    x = norm(h)
    w = getattr(lm_head, "weight", None)
    if w is not None and w is embed_tokens.weight:
        return torch.matmul(w, x.transpose(0, 1)).transpose(0, 1).float()
    return lm_head(x).float()
