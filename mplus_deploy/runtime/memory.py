"""Host memory manager (spec §13.2 "Host memory manager", R1/R2).

One ``HostMemory`` per memory state (engine session). It owns:

- the STM as hidden rows [L, N, d] (needed for ``mem_tail`` of the next update) plus, per STM row, its
  W_dec pre-RoPE K/V ([L, Hkv, N, Dh] each) and its retriever key ([L, N, d_r]). After each update only
  the K new rows are projected (``project``: the ``memory_project`` graph or its torch twin); kept rows
  are gathered with the same keep indices as the hidden rows.
- the LTM and the pending cache in K/V form (R2: no LTM hidden states at query time): a row is
  ``[k (Hkv*Dh) | v (Hkv*Dh)]`` flattened, plus its retriever key, age and (merged rows) rf.
- the drop RNG and the ages / merge / eviction arithmetic.

The arithmetic is not re-implemented: the bookkeeping lives in a ``MemoryState`` whose ``ltm`` /
``pend_vals`` hold the packed K/V rows instead of hidden states, so ``draw_drops``, ``write_stm``,
``append_pending`` and ``merge`` are the reference's own code (same generator contract, same
dtypes, same eviction rule).

``prefill_feeds()`` packs the inputs of the ``prefill`` graph (docs/graphs.md): LTM + pending per layer
padded to a common capacity S with ``valid_len`` / ``merged_len``; buffers are kept between queries and
only the rows appended since the last query are written (a merge rebuilds them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import MemoryState

# project(rows [L, n, d]) -> (keys [L, n, d_r] | None, k [L, Hkv, n, Dh], v [L, Hkv, n, Dh])
Project = Callable[[torch.Tensor], tuple]

PROJECT_CHUNK = 4096  # rows per memory_project call when converting a whole STM / LTM at load


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v [L, Hkv, n, Dh] -> rows [L, n, 2*Hkv*Dh] (k first)."""
    L, H, n, D = k.shape
    return torch.cat([k.permute(0, 2, 1, 3).reshape(L, n, H * D), v.permute(0, 2, 1, 3).reshape(L, n, H * D)], -1)


def unpack_kv(rows: torch.Tensor, hkv: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., n, 2*Hkv*Dh] -> k, v [..., Hkv, n, Dh]."""
    *lead, n, _ = rows.shape
    k = rows[..., : hkv * dh].reshape(*lead, n, hkv, dh).transpose(-3, -2)
    v = rows[..., hkv * dh:].reshape(*lead, n, hkv, dh).transpose(-3, -2)
    return k, v


def project_chunked(project: Project, rows: torch.Tensor, cfg: MPlusConfig, chunk: int = PROJECT_CHUNK):
    L, n = rows.shape[:2]
    if n == 0:
        z = torch.zeros(L, cfg.num_key_value_heads, 0, cfg.dh, dtype=rows.dtype)
        return torch.zeros(L, 0, cfg.selector_hidden_dim, dtype=rows.dtype), z, z.clone()
    keys, ks, vs = [], [], []
    for s in range(0, rows.shape[1], chunk):
        kk, k, v = project(rows[:, s: s + chunk].contiguous())
        keys.append(kk), ks.append(k), vs.append(v)
    key = None if keys[0] is None else torch.cat(keys, 1)
    return key, torch.cat(ks, 2), torch.cat(vs, 2)


@dataclass
class _FeedCache:
    version: int
    merged: tuple  # merged rows per layer when built
    n_pending: int
    feeds: dict


class HostMemory:
    def __init__(self, cfg: MPlusConfig, state: MemoryState, stm_k: torch.Tensor, stm_v: torch.Tensor,
                 stm_keys: torch.Tensor | None, stm_written: torch.Tensor | None = None):
        self.cfg = cfg
        self.state = state  # state.ltm / state.pend_vals hold packed K/V rows (see module doc)
        self.stm_k, self.stm_v, self.stm_keys = stm_k, stm_v, stm_keys
        L, N = state.stm.shape[:2]
        self.stm_written = torch.zeros(L, N, dtype=torch.bool) if stm_written is None else stm_written
        self._feeds: _FeedCache | None = None
        self.max_ltm_rows: int | None = None  # padded S bound of the prefill graph (TensorRT profile max)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hidden(cls, cfg: MPlusConfig, mem: MemoryState, project: Project) -> "HostMemory":
        """Convert a hidden-state ``MemoryState`` (checkpoint / artifact initial memory) once (R2)."""
        hid = mem.clone()
        stm_keys, stm_k, stm_v = project_chunked(project, hid.stm, cfg)
        if cfg.is_mplus:
            sizes = {int(t.shape[0]) for t in hid.ltm}
            if len(sizes) == 1:  # the usual case: one projection for all layers
                _, k, v = project_chunked(project, torch.stack(hid.ltm), cfg)
                packed = pack_kv(k, v)
                hid.ltm = [packed[l].clone() for l in range(hid.L)]
            else:
                for l in range(hid.L):
                    _, k, v = project_chunked(project, _one_layer(hid.ltm, l, hid.L), cfg)
                    hid.ltm[l] = pack_kv(k, v)[l].contiguous()
            if hid.pend_vals is not None:
                _, k, v = project_chunked(project, hid.pend_vals, cfg)
                hid.pend_vals = pack_kv(k, v)
        else:
            stm_keys = None
        return cls(cfg, hid, stm_k.contiguous(), stm_v.contiguous(), stm_keys)

    # ------------------------------------------------------------------ basics
    @property
    def L(self) -> int:
        return self.state.L

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def generator(self) -> torch.Generator:
        return self.state.generator

    def seed(self, s: int) -> None:
        self.state.seed(s)

    def mem_tail(self) -> torch.Tensor:
        K, N = self.cfg.K, self.cfg.N
        return self.state.stm[:, N - K:].contiguous()

    def stats(self) -> dict:
        st = self.state
        out = {
            "stm_slots": int(st.stm.shape[1]),
            "stm_fill": float(self.stm_written.float().mean()),
            "ltm_rows": [int(x.shape[0]) for x in st.ltm],
            "pending_rows": st.n_pending,
            "update_step": st.update_step,
            "updates_until_merge": (
                (self.cfg.update_ltm_frequency * self.cfg.K - st.update_step + self.cfg.K - 1) // self.cfg.K
                if self.cfg.is_mplus else None
            ),
            "version": st.version,
        }
        return out

    def clone(self) -> "HostMemory":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        h = HostMemory(self.cfg, self.state.clone(), self.stm_k.clone(), self.stm_v.clone(), c(self.stm_keys),
                       self.stm_written.clone())
        h.max_ltm_rows = self.max_ltm_rows
        return h

    def equal(self, other: "HostMemory") -> bool:
        def eq(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

        return (self.state.equal(other.state) and eq(self.stm_k, other.stm_k) and eq(self.stm_v, other.stm_v)
                and eq(self.stm_keys, other.stm_keys) and eq(self.stm_written, other.stm_written))

    # ------------------------------------------------------------------ one update (spec §4, §5)
    def write(self, delta: torch.Tensor, project: Project) -> bool:
        """Apply one update's ``delta`` [L, K, d]. Returns True when the LTM merged."""
        st, cfg = self.state, self.cfg
        if not st.initialized:
            raise NotImplementedError(
                "this MemoryLLM memory is not initialized (initialized == 0): the first-update tiling path is "
                "only in the torch reference (MPlus.inject); load an initialized checkpoint")
        keep, drop = st.draw_drops()  # the only random draws (spec §9)
        new_keys, new_k, new_v = project(delta.contiguous())  # only the K new rows are projected (R1)
        li = torch.arange(self.L)[:, None]
        k_rows, v_rows = self.stm_k.transpose(1, 2), self.stm_v.transpose(1, 2)  # [L, N, Hkv, Dh] views
        dropped_kv = torch.cat([k_rows[li, drop].flatten(2), v_rows[li, drop].flatten(2)], -1)
        dropped_keys = None if self.stm_keys is None else self.stm_keys[li, drop]
        self.stm_k = torch.cat([k_rows[li, keep], new_k.transpose(1, 2).to(k_rows.dtype)], 1).transpose(1, 2).contiguous()
        self.stm_v = torch.cat([v_rows[li, keep], new_v.transpose(1, 2).to(v_rows.dtype)], 1).transpose(1, 2).contiguous()
        if self.stm_keys is not None:
            self.stm_keys = torch.cat([self.stm_keys[li, keep], new_keys.to(self.stm_keys.dtype)], 1)
        K = delta.shape[1]
        self.stm_written = torch.cat([self.stm_written[li, keep], torch.ones(self.L, K, dtype=torch.bool)], 1)
        _, dropped_age = st.write_stm(delta, keep, drop)  # hidden rows + ages: the reference code
        merged = False
        if cfg.is_mplus:
            merged = st.append_pending(dropped_kv, dropped_keys, dropped_age)
        st.touch()
        return merged

    # ------------------------------------------------------------------ prefill inputs
    def check_ltm(self) -> None:
        for l, t in enumerate(self.state.ltm):
            if t.shape[0] == 0:
                raise ValueError(
                    f"layer {l}: the long-term memory is empty, retrieval is undefined (the official code loops "
                    "forever, spec §8); load an artifact with an initial LTM or memorize more text first")

    def prefill_feeds(self) -> dict:
        """Memory inputs of the ``prefill`` graph (docs/graphs.md), CPU tensors, cached per version."""
        st, cfg = self.state, self.cfg
        fc = self._feeds
        if fc is not None and fc.version == st.version:
            return fc.feeds
        feeds = {"stm_k": self.stm_k, "stm_v": self.stm_v}
        if cfg.is_mplus:
            merged = tuple(int(t.shape[0]) for t in st.ltm)
            n_p = st.n_pending
            if fc is not None and fc.merged == merged and n_p >= fc.n_pending and \
                    max(merged) + n_p <= fc.feeds["ltm_keys"].shape[1]:
                ltm = self._append_pending(fc, merged, n_p)
            else:
                ltm = self._build_ltm(merged, n_p)
            feeds.update({k: v for k, v in ltm.items() if not k.startswith("stm_")})
            self._feeds = _FeedCache(st.version, merged, n_p, feeds)
        else:
            self._feeds = _FeedCache(st.version, (), 0, feeds)
        return feeds

    def _capacity(self, rows: int) -> int:
        # Room for a full merge period of pending rows before a rebuild; S >= K0 (graph contract).
        step = self.cfg.update_ltm_frequency * self.cfg.K
        cap = -(-max(rows + step, self.cfg.K0) // 256) * 256
        if self.max_ltm_rows:
            cap = max(min(cap, self.max_ltm_rows), rows, self.cfg.K0)
        return cap

    def _ages(self, merged, n_p, S) -> torch.Tensor:
        st = self.state
        ages = torch.zeros(self.L, S, dtype=torch.int64)
        for l in range(self.L):
            ages[l, : merged[l]] = st.ltm_ages[l].to(torch.int64)
            if n_p:
                ages[l, merged[l]: merged[l] + n_p] = st.pend_ages[l].to(torch.int64)
        return ages

    def _build_ltm(self, merged, n_p) -> dict:
        st, cfg = self.state, self.cfg
        L, Hkv, Dh, dr = self.L, cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
        S = self._capacity(max(merged) + n_p)
        keys = torch.zeros(L, S, dr, dtype=self.stm_k.dtype)
        kv = torch.zeros(L, S, 2 * Hkv * Dh, dtype=self.stm_k.dtype)
        for l in range(L):
            m = merged[l]
            keys[l, :m], kv[l, :m] = st.ltm_keys[l], st.ltm[l]
            if n_p:
                keys[l, m: m + n_p], kv[l, m: m + n_p] = st.pend_keys[l], st.pend_vals[l]
        k, v = unpack_kv(kv, Hkv, Dh)
        return {
            "ltm_keys": keys, "ltm_k": k.contiguous(), "ltm_v": v.contiguous(),
            "ltm_ages": self._ages(merged, n_p, S),
            "valid_len": torch.tensor([m + n_p for m in merged], dtype=torch.int64),
            "merged_len": torch.tensor(merged, dtype=torch.int64),
        }

    def _append_pending(self, fc: _FeedCache, merged, n_p) -> dict:
        """Only pending rows appended since the last query are written into the kept buffers."""
        st, cfg = self.state, self.cfg
        f = dict(fc.feeds)
        Hkv, Dh = cfg.num_key_value_heads, cfg.dh
        old = fc.n_pending
        if n_p > old:
            k, v = unpack_kv(st.pend_vals[:, old:n_p], Hkv, Dh)  # [L, Hkv, n, Dh]
            for l in range(self.L):
                a, b = merged[l] + old, merged[l] + n_p
                f["ltm_keys"][l, a:b] = st.pend_keys[l, old:n_p]
                f["ltm_k"][l, :, a:b] = k[l]
                f["ltm_v"][l, :, a:b] = v[l]
        S = f["ltm_keys"].shape[1]
        f["ltm_ages"] = self._ages(merged, n_p, S)  # every age moved by +K (spec §5.2)
        f["valid_len"] = torch.tensor([m + n_p for m in merged], dtype=torch.int64)
        return f


def _one_layer(rows: list, l: int, L: int) -> torch.Tensor:
    """Layer l's rows as an [L, n, d] batch, zeros in the other layers' slots: ``project`` works on all
    layers at once, and per-layer LTM sizes can differ (spec §2)."""
    x = rows[l]
    out = torch.zeros(L, x.shape[0], x.shape[1], dtype=x.dtype)
    out[l] = x
    return out
