"""The torch backend's fast decode (``TorchRunner(fast=True)``, the default on CUDA): a preallocated KV cache
written in place, one decode step of fixed shapes, captured once as a CUDA graph and replayed.

Reference decode (``forward.decode_step``) grows every layer's cache by ``torch.cat`` at every step (a copy of
the whole prefix + tail per layer per token: at mplus-8b shapes 12.8k+ rows x 32 layers) and launches each
kernel from Python. Here:

- a ``DecodeSlot`` holds per layer K/V buffers ``[L, Hkv, cap, Dh]`` (zeros: masked rows must be finite) and
  static ``tok``/``pos`` inputs and ``logits`` output on the device. A generation copies prefill's cache into a
  slot once; each step writes its new row at ``pos`` (``index_copy_``) and attends over the first ``R`` rows
  with the mask ``j <= pos`` (``scaled_dot_product_attention``, GQA), ``R`` = ``pos + 1`` rounded up to a
  ``bucket`` so one captured graph serves ``bucket`` consecutive steps;
- on CUDA each (slot, R) step is captured as a ``torch.cuda.CUDAGraph`` (after one warm-up run on a side
  stream, all graphs sharing one memory pool) and replayed: one launch per token. On the CPU the same step
  function runs eagerly (what the CPU tests compare with the reference);
- slots are pooled: a generation's ``StaticKV`` handle returns its slot (with its captured graphs) to the pool
  when the generation is dropped, so concurrent generations (several sessions) each have their own.

The step is the reference's math (``block_with_prefix_kv``'s RoPE, projections, ``layer_tail``) over the same
rows; it differs from it only by the attention kernel's summation order (tests: logits within 1e-5 relative
of the reference in fp32, greedy tokens equal).
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from mplus_deploy.model.layers import ADAPTER_GENERATE, layer_tail
from mplus_deploy.model.rope import apply_rope

BUCKET = 256  # rows per captured attention length
GROW = 1024  # spare rows a new slot gets beyond the generation's current length


class DecodeSlot:
    def __init__(self, L: int, Hkv: int, cap: int, Dh: int, dtype: torch.dtype, device: torch.device):
        self.cap = int(cap)
        self.k = torch.zeros(L, Hkv, cap, Dh, dtype=dtype, device=device)
        self.v = torch.zeros(L, Hkv, cap, Dh, dtype=dtype, device=device)
        self.tok = torch.zeros(1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None
        self.graphs: dict = {}  # R -> torch.cuda.CUDAGraph


class StaticKV:
    """One generation's cache: a slot and its length (prefix + tail rows); returned under every ``present_*``
    name and fed back as the next step's ``past_k.0``."""

    def __init__(self, decoder: "StaticDecoder", slot: DecodeSlot, length: int, prefix_len: int):
        self.decoder, self.slot, self.length, self.prefix_len = decoder, slot, int(length), int(prefix_len)
        self._fin = weakref.finalize(self, decoder.release, slot)

    def tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail rows (contract form, CPU): [L, Hkv, C, Dh] each."""
        s, P = self.slot, self.prefix_len
        return s.k[:, :, P: self.length].cpu(), s.v[:, :, P: self.length].cpu()


class StaticCache:
    """``start_decode``'s object (``kvcache.DecodeCache``'s interface) over a ``StaticKV``."""

    def __init__(self, kv: StaticKV, L: int):
        self.kv, self.keep = kv, tuple(f"present_{c}.{l}" for l in range(L) for c in "kv")

    def feeds(self) -> dict:
        return {"past_k.0": self.kv}

    def advance(self, out: dict) -> None:
        self.kv = out["present_k.0"]


class StaticDecoder:
    def __init__(self, model, device: torch.device, bucket: int = BUCKET, cuda_graphs: bool | None = None):
        self.m, self.cfg, self.device = model, model.config, torch.device(device)
        self.bucket = int(bucket)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'")
        self._free: list[DecodeSlot] = []
        self._lock = threading.Lock()
        self._pool = None
        self._rope: tuple | None = None  # (cap, cos, sin) tables for positions 0..cap-1

    # ------------------------------------------------------------------ slots
    def release(self, slot: DecodeSlot) -> None:
        with self._lock:
            self._free.append(slot)

    def _acquire(self, need: int) -> DecodeSlot:
        with self._lock:
            fits = [s for s in self._free if s.cap >= need]
            if fits:
                s = min(fits, key=lambda s: s.cap)
                self._free.remove(s)
                return s
        cfg = self.cfg
        cap = -(-(need + GROW) // self.bucket) * self.bucket
        return DecodeSlot(cfg.num_hidden_layers, cfg.num_key_value_heads, cap, cfg.dh, self.m.dtype, self.device)

    def _tables(self, cap: int):
        if self._rope is None or self._rope[0] < cap:
            cos, sin = self.m.rope_tables(torch.arange(cap), self.m.dtype)
            self._rope = (cap, cos.to(self.device), sin.to(self.device))
        return self._rope[1], self._rope[2]

    def start(self, layers, prefix_len: int, length: int) -> StaticKV:
        """A slot filled with ``layers`` (per layer post-RoPE (k, v) [Hkv, length, Dh], or stacked
        [L, Hkv, length, Dh] tensors)."""
        slot = self._acquire(length + 1)
        with torch.no_grad():
            for l, (k, v) in enumerate(layers):
                slot.k[l, :, :length].copy_(k)
                slot.v[l, :, :length].copy_(v)
        return StaticKV(self, slot, length, prefix_len)

    def _grown(self, kv: StaticKV) -> StaticKV:
        """``kv`` moved to a slot with room for one more row (its old slot goes back to the pool)."""
        s, n = kv.slot, kv.length
        return self.start([(s.k[l, :, :n], s.v[l, :, :n]) for l in range(self.cfg.num_hidden_layers)], kv.prefix_len, n)

    # ------------------------------------------------------------------ the step
    def _step(self, slot: DecodeSlot, R: int) -> None:
        m, cfg = self.m, self.cfg
        cos_t, sin_t = self._tables(slot.cap)
        cos, sin = cos_t.index_select(0, slot.pos), sin_t.index_select(0, slot.pos)
        mask = (torch.arange(R, device=self.device) <= slot.pos)[None, None, None, :]
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        x = m.model.embed_tokens(slot.tok)
        for l, layer in enumerate(m.model.layers):
            att = layer.self_attn
            xn = layer.input_layernorm(x)
            q = apply_rope(att.q(xn, ADAPTER_GENERATE), cos, sin)
            k, v = att.kv(xn, ADAPTER_GENERATE)
            slot.k[l].index_copy_(1, slot.pos, apply_rope(k, cos, sin).to(slot.k.dtype))
            slot.v[l].index_copy_(1, slot.pos, v.to(slot.v.dtype))
            o = F.scaled_dot_product_attention(q[None], slot.k[l, :, :R][None], slot.v[l, :, :R][None], attn_mask=mask,
                                               enable_gqa=g > 1)[0]
            x = layer_tail(layer, x, o.transpose(0, 1).reshape(1, -1), ADAPTER_GENERATE)
        out = m.logits(x)[0]
        if slot.logits is None:
            slot.logits = torch.empty_like(out)
        slot.logits.copy_(out)

    def _graph(self, slot: DecodeSlot, R: int):
        g = slot.graphs.get(R)
        if g is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: allocator, cuBLAS handles, lazy tables (restored below)
                self._step(slot, R)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._step(slot, R)
            slot.graphs[R] = g
        return g

    @torch.no_grad()
    def step(self, kv: StaticKV, tok: int, pos: int) -> tuple[torch.Tensor, StaticKV]:
        """Logits [vocab] (on the device) of token ``tok`` at position ``pos``; the cache gains row ``pos``."""
        if pos != kv.length:
            raise ValueError(f"static decode: position {pos} does not follow the cache's {kv.length} rows "
                             "(a StaticKV is advanced by each step and cannot be fed twice)")
        if kv.length + 1 > kv.slot.cap:
            kv = self._grown(kv)
        slot = kv.slot
        R = min(slot.cap, -(-(pos + 1) // self.bucket) * self.bucket)
        slot.tok.fill_(int(tok))
        slot.pos.fill_(int(pos))
        if self.cuda_graphs:
            self._tables(slot.cap)  # outside capture
            # the warm-up run of a fresh capture already wrote row ``pos``; replaying rewrites the same values
            self._graph(slot, R).replay()
        else:
            self._step(slot, R)
        kv.length += 1
        return slot.logits, kv
