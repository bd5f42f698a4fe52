"""The LTM + pending store of one memory (``runtime/memory.py`` uses it): capacity-managed buffers laid out
as the ``prefill`` graph takes them (``ltm_k`` / ``ltm_v`` [L, Hkv, S, Dh], ``ltm_keys`` [L, S, d_r], ages,
rf), rows appended in place, merges compacting survivors in place, geometric growth."""
from __future__ import annotations

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import decay_and_evict

ROW_ALIGN = 256  # LTM capacity is a multiple of this
GROWTH = 1.25  # capacity growth factor (amortized: each row is copied at most 1/(GROWTH-1) = 4 times)
MOVE_CHUNK_BYTES = 32 << 20  # bound on the temporary of an in-place row compaction
RUN_MIN_BYTES = 16 << 10  # compaction moves runs of consecutive rows when they average at least this


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v [L, Hkv, n, Dh] -> rows [L, n, 2*Hkv*Dh] (k first): the snapshot's row form."""
    L, H, n, D = k.shape
    return torch.cat([k.permute(0, 2, 1, 3).reshape(L, n, H * D), v.permute(0, 2, 1, 3).reshape(L, n, H * D)], -1)


def unpack_kv(rows: torch.Tensor, hkv: int, dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., n, 2*Hkv*Dh] -> k, v [..., Hkv, n, Dh]."""
    *lead, n, _ = rows.shape
    k = rows[..., : hkv * dh].reshape(*lead, n, hkv, dh).transpose(-3, -2)
    v = rows[..., hkv * dh:].reshape(*lead, n, hkv, dh).transpose(-3, -2)
    return k, v


def compact_(t: torch.Tensor, dim: int, idx: torch.Tensor) -> int:
    """In place: row ``idx[j]`` of ``t`` (along ``dim``) moves to row j, for ascending ``idx`` (so
    idx[j] >= j: a forward pass never overwrites a row it still has to read). Rows before the first
    moved one stay put. ``idx`` is cut into runs of consecutive rows (an STM update: ~K+1 runs; a FIFO
    eviction: one), each moved in pieces of at most ``MOVE_CHUNK_BYTES``: a plain copy when source and
    destination are disjoint, else through a piece-sized temporary. Runs averaging under
    ``RUN_MIN_BYTES`` (scattered indices, tiny rows: ages, flags) go through a chunk-sized
    ``index_select`` instead. Returns ``len(idx)``; rows from there on are left as they were."""
    n = int(idx.numel())
    if n == 0:
        return 0
    idx = idx.to(torch.int64)
    brk = ((idx[1:] - idx[:-1]) != 1).nonzero().flatten() + 1
    if int(idx[-1]) == n - 1 and brk.numel() == 0:
        return n  # nothing moves
    row_bytes = max(1, t.numel() // max(1, t.shape[dim]) * t.element_size())
    step = max(1, MOVE_CHUNK_BYTES // row_bytes)
    if row_bytes * n < RUN_MIN_BYTES * (brk.numel() + 1):  # short runs (or tiny rows): gather in chunks
        moved = (idx != torch.arange(n)).nonzero()
        for a in range(int(moved[0]), n, step):
            b = min(a + step, n)
            t.narrow(dim, a, b - a).copy_(t.index_select(dim, idx[a:b]))
        return n
    starts = [0] + brk.tolist()
    ends = starts[1:] + [n]
    tmp = None
    for a, b, src in zip(starts, ends, idx[starts].tolist()):
        if src == a:
            continue
        for p in range(a, b, step):
            c, sp = min(step, b - p), src + (p - a)
            dst, s = t.narrow(dim, p, c), t.narrow(dim, sp, c)
            if sp >= p + c:
                dst.copy_(s)
            else:
                if tmp is None:
                    tmp = torch.empty_like(t.narrow(dim, 0, min(step, n)))
                tv = tmp.narrow(dim, 0, c)
                tv.copy_(s)
                dst.copy_(tv)
    return n


def compact_layers_(t: torch.Tensor, dim: int, keep: torch.Tensor) -> None:
    """``compact_`` of every layer: for each l, rows ``keep[l]`` (ascending, [L, n]) of ``t[l]`` along ``dim``
    move to rows 0..n-1. A layer of at most ``MOVE_CHUNK_BYTES`` is moved by one ``index_select`` and one copy
    (an STM update of a small model; measured fastest of gather, advanced indexing and this, bench/RESULTS.md
    issue 16); a larger one by ``compact_`` (its temporaries stay bounded)."""
    n = keep.shape[1]
    for l in range(keep.shape[0]):
        tl = t[l]
        if tl.numel() * tl.element_size() > MOVE_CHUNK_BYTES:
            compact_(tl, dim, keep[l])
        else:
            tl.narrow(dim, 0, n).copy_(tl.index_select(dim, keep[l]))


def _round_rows(n: int) -> int:
    return -(-int(n) // ROW_ALIGN) * ROW_ALIGN


def ltm_capacity(cfg: MPlusConfig, need: int, merged_max: int, limit: int | None = None, grow_from: int = 0) -> int:
    """LTM store capacity (rows per layer) for ``need`` rows: room for a whole merge period of pending rows
    after the merged ones, at least ``GROWTH`` x the current capacity when growing, >= K0 (graph
    contract), a multiple of ``ROW_ALIGN``; bounded by ``limit`` (the prefill graph's S range, e.g. a
    TensorRT profile max) unless ``need`` itself is larger."""
    period = cfg.update_ltm_frequency * cfg.K
    cap = _round_rows(max(need, merged_max + period, int(grow_from * GROWTH), cfg.K0))
    if limit:
        cap = max(min(cap, int(limit)), need, cfg.K0)
    return cap


# ====================================================================================== LTM store
class LtmStore:
    """LTM + pending of every layer in one set of buffers, in the ``prefill`` graph's layout.

    ``k``, ``v`` [L, Hkv, cap, Dh] and ``keys`` [L, cap, d_r] in the memory dtype; ``ages``, ``rf``
    [L, cap] float64 (the bookkeeping); ``feed_ages`` [L, cap] int64 (the graph's ``ltm_ages``,
    refreshed from ``ages`` when a query needs it); ``merged_len`` / ``valid_len`` [L] int64 mirror the
    python lists ``merged`` / ``valid``. Per layer: [0, merged) merged rows, [merged, valid) pending
    rows (the same count in every layer, spec §2), [valid, cap) zeros."""

    FIELDS = (("k", 2), ("v", 2), ("keys", 1), ("ages", 1), ("rf", 1), ("feed_ages", 1))  # (buffer, row dim)

    def __init__(self, cfg: MPlusConfig, L: int, dtype: torch.dtype, cap: int, limit: int | None = None):
        self.cfg, self.L, self.dtype, self.limit = cfg, L, dtype, limit
        H, D, dr = cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
        self.k = torch.zeros(L, H, cap, D, dtype=dtype)
        self.v = torch.zeros(L, H, cap, D, dtype=dtype)
        self.keys = torch.zeros(L, cap, dr, dtype=dtype)
        self.ages = torch.zeros(L, cap, dtype=torch.float64)
        self.rf = torch.zeros(L, cap, dtype=torch.float64)
        self.feed_ages = torch.zeros(L, cap, dtype=torch.int64)
        self.merged, self.valid = [0] * L, [0] * L
        self.merged_len = torch.zeros(L, dtype=torch.int64)
        self.valid_len = torch.zeros(L, dtype=torch.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def cap(self) -> int:
        return int(self.keys.shape[1])

    @property
    def n_pending(self) -> int:
        return self.valid[0] - self.merged[0] if self.L else 0

    def set_lengths(self, merged: list[int], valid: list[int]) -> None:
        self.merged, self.valid = [int(x) for x in merged], [int(x) for x in valid]
        self.merged_len.copy_(torch.tensor(self.merged, dtype=torch.int64))
        self.valid_len.copy_(torch.tensor(self.valid, dtype=torch.int64))

    def row_bytes(self) -> int:
        """Bytes of one row in one layer, all buffers (K/V, key, ages, rf, feed ages)."""
        return sum(getattr(self, f).numel() // self.cap * getattr(self, f).element_size()
                   for f, _ in self.FIELDS) // self.L if self.cap and self.L else 0

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f, _ in self.FIELDS)

    def capacity_for(self, need: int, grow_from: int = 0) -> int:
        return ltm_capacity(self.cfg, need, max(self.merged), self.limit, grow_from)

    def reserve(self, need: int) -> None:
        if need > self.cap:
            self.resize(self.capacity_for(need, grow_from=self.cap))

    def resize(self, cap: int) -> None:
        """Reallocate every buffer at ``cap`` rows keeping the rows in use: one buffer at a time, so the
        transient is one old buffer, not a second copy of the whole store."""
        keep = max(self.valid) if self.L else 0
        if cap < keep:
            raise ValueError(f"LTM capacity {cap} < {keep} rows in use")
        if cap == self.cap:
            return
        for name, dim in self.FIELDS:
            old = getattr(self, name)
            shape = list(old.shape)
            shape[dim] = cap
            new = torch.zeros(shape, dtype=old.dtype)
            new.narrow(dim, 0, keep).copy_(old.narrow(dim, 0, keep))
            setattr(self, name, new)
            del old, new

    # ------------------------------------------------------------------ the update arithmetic (spec §5)
    def add_ages(self, K: int) -> None:
        """Every merged and pending age += K (spec §5.2), in place (the reference's ``a + K``)."""
        if len(set(self.valid)) == 1:
            self.ages[:, : self.valid[0]] += K
        else:
            for l in range(self.L):
                self.ages[l, : self.valid[l]] += K

    def append(self, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
        """Append one batch of pending rows per layer (k, v [L, Hkv, n, Dh], keys [L, n, d_r], ages [L, n])
        at the end of each layer's valid region."""
        n = int(k.shape[2])
        self.reserve(max(self.valid) + n)
        for l in range(self.L):
            a = self.valid[l]
            self.k[l, :, a: a + n] = k[l]
            self.v[l, :, a: a + n] = v[l]
            self.keys[l, a: a + n] = keys[l]
            self.ages[l, a: a + n] = ages[l]
        self.set_lengths(self.merged, [x + n for x in self.valid])

    def merge(self, rf0: float, dec: float, K0: int) -> None:
        """`update_ltm` (spec §5.3) per layer, in place: the pending rows (already after the merged ones)
        get rf = RF0 and become merged; ``decay_and_evict`` decides; survivors are compacted in place
        and the freed tail zeroed."""
        merged, valid = list(self.merged), list(self.valid)
        for l in range(self.L):
            m, n = self.merged[l], self.valid[l]
            self.rf[l, m:n] = rf0
            alive, rf = decay_and_evict(self.rf[l, :n], dec, K0)
            if alive is not None:
                idx = alive.nonzero().flatten()
                s = compact_(self.k[l], 1, idx)
                compact_(self.v[l], 1, idx)
                compact_(self.keys[l], 0, idx)
                compact_(self.ages[l], 0, idx)
                for name, dim in self.FIELDS:
                    getattr(self, name)[l].narrow(dim - 1, s, n - s).zero_()
                n = s
            self.rf[l, :n] = rf
            merged[l] = valid[l] = n
        self.set_lengths(merged, valid)

    def refresh_feed_ages(self) -> None:
        """``feed_ages`` = ``ages`` as int64 (the reference's ``.to(torch.int64)``) on the valid rows."""
        for l in range(self.L):
            self.feed_ages[l, : self.valid[l]].copy_(self.ages[l, : self.valid[l]])

    # ------------------------------------------------------------------ views, copies
    def layer(self, l: int, a: int | None = None, b: int | None = None) -> dict:
        """Views of layer l's rows [a, b) (default: the valid rows)."""
        a = 0 if a is None else a
        b = self.valid[l] if b is None else b
        return {"k": self.k[l, :, a:b], "v": self.v[l, :, a:b], "keys": self.keys[l, a:b],
                "ages": self.ages[l, a:b], "rf": self.rf[l, a:b]}

    def clone(self) -> "LtmStore":
        c = LtmStore.__new__(LtmStore)
        c.cfg, c.L, c.dtype, c.limit = self.cfg, self.L, self.dtype, self.limit
        keep = max(self.valid) if self.L else 0
        for name, dim in self.FIELDS:
            old = getattr(self, name)
            new = torch.zeros_like(old)
            new.narrow(dim, 0, keep).copy_(old.narrow(dim, 0, keep))
            setattr(c, name, new)
        c.merged_len, c.valid_len = self.merged_len.clone(), self.valid_len.clone()
        c.merged, c.valid = list(self.merged), list(self.valid)
        return c

    def equal(self, other: "LtmStore") -> bool:
        if self.merged != other.merged or self.valid != other.valid or self.dtype != other.dtype:
            return False
        for l in range(self.L):
            a, b = self.layer(l), other.layer(l)
            if not all(torch.equal(a[f], b[f]) for f in a):
                return False
        return True


# ====================================================================================== bookkeeping
