"""Host memory manager (spec §13.2 "Host memory manager", R1/R2).

One ``HostMemory`` per memory state (engine session). It owns:

- the STM as hidden rows [L, N, d] (needed for ``mem_tail`` of the next update) plus, per STM row, its
  W_dec pre-RoPE K/V ([L, Hkv, N, Dh] each) and its retriever key ([L, N, d_r]). After each update the
  engine projects only the K new rows (the ``memory_project`` graph) and hands the tensors to ``write``;
  the kept K/V and key rows are compacted in place with the update's keep indices (the graphs read them in
  slot order). The hidden rows, which no graph reads whole, are not moved: the K new rows overwrite the
  dropped rows' physical slots and a per-layer slot order [L, N] (``HostState``) records the logical order;
  reading ``state.stm`` puts the rows in order first, one layer at a time (snapshots, comparisons).
  Nothing here calls a runner: the conversion of a hidden-state memory at load is ``memory_convert.py``.
- the LTM and the pending cache in K/V form (R2: no LTM hidden states at query time) in one
  ``LtmStore``: capacity-managed buffers laid out exactly as the ``prefill`` graph takes them
  (``ltm_k`` / ``ltm_v`` [L, Hkv, S, Dh], ``ltm_keys`` [L, S, d_r], ages, rf). Per layer, rows
  [0, merged) are the merged LTM, [merged, valid) the pending cache, [valid, S) zero pads. Dropped rows
  are appended in place at ``valid``; a merge relabels pending rows as merged (no copy) and evicts by
  compacting the survivors in place; capacity grows geometrically (amortized O(rows written)).
  ``prefill_feeds()`` returns these buffers themselves: no copy per query, no rebuild per merge.
- the drop RNG and the ages / merge / eviction arithmetic: ``draw_drops`` is the reference
  ``MemoryState``'s own code, the eviction rule is ``model.memory.decay_and_evict`` (shared with
  ``MemoryState.merge``); ages, rf, dtypes and merge timing follow ``MemoryState`` step by step, and
  tests compare both bit for bit through merges with per-layer evictions.

Dtypes: K/V and retriever keys in the memory dtype (the ``memory_project`` output dtype: the artifact
precision); ages and rf float64 (as ``MemoryState``), plus an int64 copy of the ages for the graph.
Nothing here hard-codes float32.
"""
from __future__ import annotations

import itertools

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import MemoryState

from .ltm_store import LtmStore, compact_, compact_layers_, ltm_capacity, pack_kv, unpack_kv  # noqa: F401 (re-exported)

_MEMORY_IDS = itertools.count(1)  # ``prefill_feeds()['memory_id']``: one number per memory version in the process

# the projections of rows [L, n, d]: (retriever keys [L, n, d_r] | None, k [L, Hkv, n, Dh], v [L, Hkv, n, Dh])
Projected = tuple


class HostState:
    """The bookkeeping of one host memory under ``MemoryState``'s attribute names: STM hidden rows and
    ages, the scalars, the drop RNG, the LTM store (ages / rf / keys read as per-layer views)."""

    draw_drops = MemoryState.draw_drops  # the reference's own code: the RNG contract (spec §9)
    keep_count = MemoryState.keep_count  # the same rule, for HostMemory.tail_after
    seed = MemoryState.seed
    touch = MemoryState.touch

    def __init__(self, cfg: MPlusConfig, stm: torch.Tensor, stm_ages: torch.Tensor, store: LtmStore | None = None,
                 generator: torch.Generator | None = None, update_step: int = 0, initialized: bool = True,
                 version: int = 0, short_chunk_warned: bool = False, ltm_age_dtype: list | None = None):
        self.cfg, self.stm_ages, self.store = cfg, stm_ages, store
        self._stm, self._order = stm, None  # hidden rows in physical slots; _order [L, N]: slots in logical order
        self.generator = generator if generator is not None else torch.Generator(device="cpu")
        self.update_step, self.initialized, self.version = int(update_step), bool(initialized), int(version)
        self.short_chunk_warned = bool(short_chunk_warned)
        self.ltm_age_dtype = list(ltm_age_dtype or [])

    # ------------------------------------------------------------------ STM hidden rows (slot layout)
    @property
    def stm(self) -> torch.Tensor:
        """[L, N, d] in logical order (``MemoryState.stm``); puts the slots in order first if an update moved them."""
        if self._order is not None:
            for l in range(self._stm.shape[0]):  # one layer's temporary at a time
                self._stm[l].copy_(self._stm[l].index_select(0, self._order[l]))
            self._order = None
        return self._stm

    @stm.setter
    def stm(self, value: torch.Tensor) -> None:
        self._stm, self._order = value, None

    @property
    def stm_shape(self) -> torch.Size:
        return self._stm.shape

    def write_stm_rows(self, keep: torch.Tensor, drop: torch.Tensor, rows: torch.Tensor) -> None:
        """``stm <- cat(stm[keep], rows)`` per layer (``MemoryState.write_stm``) when ``drop`` (the complement of
        ``keep``) has as many rows as ``rows``: the new rows go to the dropped rows' slots, nothing else moves."""
        L, N = self._stm.shape[:2]
        order = self._order if self._order is not None else torch.arange(N).expand(L, N)
        freed = order.gather(1, drop)
        self._stm[torch.arange(L)[:, None], freed] = rows.to(self._stm.dtype)
        self._order = torch.cat([order.gather(1, keep), freed], 1)

    def stm_tail(self, K: int) -> torch.Tensor:
        """The last K logical rows [L, K, d] (contiguous), without ordering the rest."""
        N = self._stm.shape[1]
        if self._order is None:
            return self._stm[:, N - K:].contiguous()
        return self._stm[torch.arange(self._stm.shape[0])[:, None], self._order[:, N - K:]]

    @property
    def L(self) -> int:
        return self._stm.shape[0]

    @property
    def n_pending(self) -> int:
        return 0 if self.store is None else self.store.n_pending

    @property
    def ltm_rows(self) -> list[int]:
        return [] if self.store is None else list(self.store.merged)

    def _merged(self, name: str) -> list:
        s = self.store
        return [] if s is None else [getattr(s, name)[l, : s.merged[l]] for l in range(s.L)]

    @property
    def ltm_ages(self) -> list:  # L x [S_l] float64 views
        return self._merged("ages")

    @property
    def ltm_rf(self) -> list:
        return self._merged("rf")

    @property
    def ltm_keys(self) -> list:
        return self._merged("keys")

    def _pending(self, name: str) -> torch.Tensor | None:
        s = self.store
        if s is None or s.n_pending == 0:
            return None
        t = getattr(s, name)
        if len(set(s.merged)) == 1:
            return t[:, s.merged[0]: s.valid[0]]
        return torch.stack([t[l, s.merged[l]: s.valid[l]] for l in range(s.L)])

    @property
    def pend_ages(self) -> torch.Tensor | None:  # [L, n_p] (a view when the layers' merged sizes agree)
        return self._pending("ages")

    @property
    def pend_keys(self) -> torch.Tensor | None:
        return self._pending("keys")

    def clone(self) -> "HostState":
        g = torch.Generator(device="cpu")
        g.set_state(self.generator.get_state())
        return HostState(self.cfg, self.stm.clone(), self.stm_ages.clone(),
                         None if self.store is None else self.store.clone(), g, self.update_step,
                         self.initialized, self.version, self.short_chunk_warned, self.ltm_age_dtype)

    def equal(self, other: "HostState") -> bool:
        """Bit-identical state (used to prove rejected calls change nothing); pads are not compared."""
        def eq(a, b):
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

        stores = (self.store is None and other.store is None) or (
            self.store is not None and other.store is not None and self.store.equal(other.store))
        return (eq(self.stm, other.stm) and eq(self.stm_ages, other.stm_ages) and stores
                and self.update_step == other.update_step and self.initialized == other.initialized
                and self.ltm_age_dtype == other.ltm_age_dtype
                and torch.equal(self.generator.get_state(), other.generator.get_state()))


# ====================================================================================== manager
class HostMemory:
    def __init__(self, cfg: MPlusConfig, state: HostState, stm_k: torch.Tensor, stm_v: torch.Tensor,
                 stm_keys: torch.Tensor | None, stm_written: torch.Tensor | None = None):
        self.cfg = cfg
        self.state = state
        self.stm_k, self.stm_v, self.stm_keys = stm_k, stm_v, stm_keys
        L, N = state.stm_shape[:2]
        self.stm_written = torch.zeros(L, N, dtype=torch.bool) if stm_written is None else stm_written
        self._feeds: tuple[int, dict] | None = None

    @property
    def store(self) -> LtmStore | None:
        return self.state.store

    @property
    def max_ltm_rows(self) -> int | None:
        """Bound on the padded S of the prefill graph (TensorRT profile max); setting it shrinks the LTM
        buffers to it when the rows in use fit."""
        return None if self.store is None else self.store.limit

    @max_ltm_rows.setter
    def max_ltm_rows(self, value: int | None) -> None:
        s = self.store
        if s is None:
            return
        s.limit = value
        if value and s.cap > value:
            s.resize(s.capacity_for(max(s.valid)))
            self._feeds = None

    # ------------------------------------------------------------------ construction (from_hidden: memory_convert.py)
    def reset_ltm(self, rows: int | list[int]) -> LtmStore:
        """Empty LTM and pending, then ``rows`` merged rows per layer (zeros, rf 0, ages 0, age dtype
        float64) for the caller to fill through the store's buffers (synthetic LTMs: profiler, bench).
        The old buffers are freed before the new ones are allocated. Call ``state.touch()`` after filling."""
        st, cfg = self.state, self.cfg
        if st.store is None:
            raise ValueError("a MemoryLLM memory has no LTM")
        rows = [int(rows)] * self.L if isinstance(rows, int) else [int(r) for r in rows]
        dtype, limit = st.store.dtype, st.store.limit
        self._feeds = None
        st.store = None
        st.store = new_store(cfg, self.L, dtype, rows, 0, limit)
        st.store.set_lengths(rows, rows)
        st.ltm_age_dtype = ["float64"] * self.L
        st.update_step = 0
        st.touch()
        return st.store

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
        return self.state.stm_tail(self.cfg.K)

    def reserve_update(self, K: int) -> None:
        """Grow the LTM store now, if the next update's K dropped rows would not fit (``write`` would grow it
        itself; ``runtime.memorize`` calls this on its own thread so that the one large allocation of an update
        is not made on the bookkeeping thread, whose malloc arena would keep the freed old buffers)."""
        s = self.state.store
        if s is not None and max(s.valid) + K > s.cap:
            self._feeds = None  # the cached feeds must not keep the old buffers alive
            s.reserve(max(s.valid) + K)

    def tail_after(self, delta: torch.Tensor) -> torch.Tensor | None:
        """What ``mem_tail()`` returns once ``write(delta, ...)`` has run, without running it: ``delta`` in the STM
        dtype when the write is the in-place one (as many rows dropped as ``delta`` has, = K, so the new rows are
        the last K logical rows); None otherwise (read ``mem_tail()`` after the write)."""
        st, K = self.state, int(delta.shape[1])
        if not st.initialized or K != self.cfg.K or st.keep_count() + K != st.stm_shape[1]:
            return None
        return delta.to(st._stm.dtype).contiguous()

    def stats(self) -> dict:
        st = self.state
        return {
            "stm_slots": int(st.stm_shape[1]),
            "stm_fill": float(self.stm_written.float().mean()),
            "ltm_rows": st.ltm_rows,
            "pending_rows": st.n_pending,
            "update_step": st.update_step,
            "updates_until_merge": (
                (self.cfg.update_ltm_frequency * self.cfg.K - st.update_step + self.cfg.K - 1) // self.cfg.K
                if self.cfg.is_mplus else None
            ),
            "version": st.version,
        }

    def memory_bytes(self) -> dict:
        """Bytes held: STM (hidden rows, ages, K/V, keys, written flags) and the LTM store (capacity)."""
        t = [self.state._stm, self.state.stm_ages, self.stm_k, self.stm_v, self.stm_written]
        if self.stm_keys is not None:
            t.append(self.stm_keys)
        stm = sum(x.numel() * x.element_size() for x in t)
        ltm = 0 if self.store is None else self.store.nbytes()
        return {"stm": stm, "ltm": ltm, "total": stm + ltm,
                "ltm_capacity_rows": 0 if self.store is None else self.store.cap}

    def clone(self) -> "HostMemory":
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return HostMemory(self.cfg, self.state.clone(), self.stm_k.clone(), self.stm_v.clone(), c(self.stm_keys),
                          self.stm_written.clone())

    def equal(self, other: "HostMemory") -> bool:
        def eq(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

        return (self.state.equal(other.state) and eq(self.stm_k, other.stm_k) and eq(self.stm_v, other.stm_v)
                and eq(self.stm_keys, other.stm_keys) and eq(self.stm_written, other.stm_written))

    # ------------------------------------------------------------------ one update (spec §4, §5)
    def write(self, delta: torch.Tensor, projected: Projected) -> bool:
        """Apply one update's ``delta`` [L, K, d] whose K new rows the caller projected (``projected``: the
        ``memory_project`` outputs of ``delta``, R1). Returns True when the LTM merged."""
        st, cfg = self.state, self.cfg
        if not st.initialized:
            raise NotImplementedError(
                "this MemoryLLM memory is not initialized (initialized == 0): the first-update tiling path is "
                "only in the torch reference (MPlus.inject); load an initialized checkpoint")
        self._feeds = None  # the cached feeds must not keep buffers alive that a growth replaces
        keep, drop = st.draw_drops()  # the only random draws (spec §9)
        new_keys, new_k, new_v = projected
        L, N, K = self.L, st.stm_shape[1], delta.shape[1]
        li = torch.arange(L)[:, None]
        if cfg.is_mplus:  # the dropped rows, before the STM moves
            dk = torch.stack([self.stm_k[l].index_select(1, drop[l]) for l in range(L)])
            dv = torch.stack([self.stm_v[l].index_select(1, drop[l]) for l in range(L)])
            dkeys = self.stm_keys[li, drop]
            dage = st.stm_ages[li, drop]
        n_keep = keep.shape[1]
        new_age = torch.arange(K - 1, -1, -1, dtype=torch.float64).expand(L, K)  # MemoryState.write_stm
        if n_keep + K == N:  # STM_l <- [STM_l[keep], new rows], in place
            st.write_stm_rows(keep, drop, delta)
            for t, dim in ((st.stm_ages, 0), (self.stm_k, 1), (self.stm_v, 1), (self.stm_written, 0), (self.stm_keys, 0)):
                if t is not None:
                    compact_layers_(t, dim, keep)
            st.stm_ages[:, n_keep:] = new_age
            self.stm_k[:, :, n_keep:] = new_k
            self.stm_v[:, :, n_keep:] = new_v
            self.stm_written[:, n_keep:] = True
            if self.stm_keys is not None:
                self.stm_keys[:, n_keep:] = new_keys
        else:  # a config whose drop count differs from K changes the STM size: the reference's concatenation
            st.stm = torch.cat([st.stm[li, keep], delta.to(st.stm.dtype)], 1)
            st.stm_ages = torch.cat([st.stm_ages[li, keep], new_age], 1)
            k_rows, v_rows = self.stm_k.transpose(1, 2), self.stm_v.transpose(1, 2)
            self.stm_k = torch.cat([k_rows[li, keep], new_k.transpose(1, 2).to(k_rows.dtype)], 1).transpose(1, 2).contiguous()
            self.stm_v = torch.cat([v_rows[li, keep], new_v.transpose(1, 2).to(v_rows.dtype)], 1).transpose(1, 2).contiguous()
            self.stm_written = torch.cat([self.stm_written[li, keep], torch.ones(L, K, dtype=torch.bool)], 1)
            if self.stm_keys is not None:
                self.stm_keys = torch.cat([self.stm_keys[li, keep], new_keys.to(self.stm_keys.dtype)], 1)
        merged = False
        if cfg.is_mplus:  # MemoryState.append_pending, on the store
            s = st.store
            s.add_ages(cfg.K)
            s.append(dk, dv, dkeys, dage)
            st.update_step += cfg.K
            if st.update_step >= cfg.update_ltm_frequency * cfg.K:
                s.merge(float(cfg.initial_rf_when_moving_stm_to_ltm), float(cfg.decay_frequency), cfg.K0)
                st.ltm_age_dtype = ["float64"] * L
                st.update_step = 0
                merged = True
        st.touch()
        return merged

    # ------------------------------------------------------------------ prefill inputs
    def prefill_feeds(self) -> dict:
        """Memory inputs of the ``prefill`` graph (docs/graphs.md): the live buffers themselves (S = the
        store's capacity, pads zero and masked by ``valid_len``). Valid until the next write; only the
        int64 ages are refreshed (8 bytes a row) when the memory changed since the last query. ``memory_id`` names
        this version (a backend keeping device copies of the memory, the torch runner's, reuses them while it holds)."""
        st = self.state
        if self._feeds is not None and self._feeds[0] == st.version:
            return self._feeds[1]
        feeds = {"stm_k": self.stm_k, "stm_v": self.stm_v, "memory_id": next(_MEMORY_IDS)}  # id: not a graph input
        s = st.store
        if s is not None:
            s.refresh_feed_ages()
            feeds.update({"ltm_keys": s.keys, "ltm_k": s.k, "ltm_v": s.v, "ltm_ages": s.feed_ages,
                          "valid_len": s.valid_len, "merged_len": s.merged_len})
        self._feeds = (st.version, feeds)
        return feeds


def new_store(cfg: MPlusConfig, L: int, dtype: torch.dtype, merged: list[int], n_pending: int,
               limit: int | None) -> LtmStore:
    """A zeroed store sized for ``merged`` + ``n_pending`` rows plus the rest of the merge period."""
    mm = max(merged) if merged else 0
    return LtmStore(cfg, L, dtype, ltm_capacity(cfg, mm + n_pending, mm, limit), limit)
