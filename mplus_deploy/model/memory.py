"""`MemoryState`: everything an inject or a query reads or writes (spec §2), and the host-side
update arithmetic of spec §4 (STM drop/write) and §5 (pending cache, ages, merge, eviction).

Dtypes: values/keys in the model dtype; ages and recall frequencies as float64 tensors (the
official numpy arrays end up float64 after the first merge; ``ltm_age_dtype`` records the dtype the
official code would hold, for ``ltm_age_order="numpy"`` replays, spec §11.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MPlusConfig


@dataclass
class MemoryState:
    cfg: MPlusConfig
    stm: torch.Tensor  # [L, N, d]
    stm_ages: torch.Tensor  # [L, N] float64, frozen after write (§4.1)
    ltm: list = field(default_factory=list)  # L x [S_l, d]
    ltm_keys: list = field(default_factory=list)  # L x [S_l, d_r]
    ltm_ages: list = field(default_factory=list)  # L x [S_l] float64
    ltm_rf: list = field(default_factory=list)  # L x [S_l] float64
    ltm_age_dtype: list = field(default_factory=list)  # L x "int32" (as loaded) | "float64" (after a merge)
    pend_vals: torch.Tensor | None = None  # [L, n_p, d]
    pend_keys: torch.Tensor | None = None  # [L, n_p, d_r]
    pend_ages: torch.Tensor | None = None  # [L, n_p] float64
    update_step: int = 0
    initialized: bool = True  # MemoryLLM's `initialized` buffer; M+ is always initialized
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))
    version: int = 0  # bumped on every change; keys the memory K/V caches (spec §12 R1)
    short_chunk_warned: bool = False

    # ------------------------------------------------------------------ basics
    @property
    def L(self) -> int:
        return self.stm.shape[0]

    @property
    def n_pending(self) -> int:
        return 0 if self.pend_vals is None else self.pend_vals.shape[1]

    def seed(self, s: int) -> None:
        """After this, drops draw what the official code draws after ``torch.manual_seed(s)`` (§9)."""
        self.generator.manual_seed(int(s))

    def touch(self) -> None:
        self.version += 1

    def stats(self) -> dict:
        return {
            "stm_slots": int(self.stm.shape[1]),
            "ltm_rows": [int(x.shape[0]) for x in self.ltm],
            "pending_rows": self.n_pending,
            "update_step": self.update_step,
            "initialized": bool(self.initialized),
        }

    def clone(self) -> "MemoryState":
        g = torch.Generator(device="cpu")
        g.set_state(self.generator.get_state())
        c = lambda t: None if t is None else t.clone()  # noqa: E731
        return MemoryState(
            cfg=self.cfg, stm=self.stm.clone(), stm_ages=self.stm_ages.clone(),
            ltm=[c(t) for t in self.ltm], ltm_keys=[c(t) for t in self.ltm_keys],
            ltm_ages=[c(t) for t in self.ltm_ages], ltm_rf=[c(t) for t in self.ltm_rf],
            ltm_age_dtype=list(self.ltm_age_dtype), pend_vals=c(self.pend_vals), pend_keys=c(self.pend_keys),
            pend_ages=c(self.pend_ages), update_step=self.update_step, initialized=self.initialized,
            generator=g, version=self.version, short_chunk_warned=self.short_chunk_warned,
        )

    def equal(self, other: "MemoryState") -> bool:
        """Bit-identical state (used to prove rejected calls change nothing)."""
        def eq(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)

        lists = all(
            len(x) == len(y) and all(eq(a, b) for a, b in zip(x, y))
            for x, y in ((self.ltm, other.ltm), (self.ltm_keys, other.ltm_keys),
                         (self.ltm_ages, other.ltm_ages), (self.ltm_rf, other.ltm_rf))
        )
        return (
            eq(self.stm, other.stm) and eq(self.stm_ages, other.stm_ages) and lists
            and eq(self.pend_vals, other.pend_vals) and eq(self.pend_keys, other.pend_keys)
            and eq(self.pend_ages, other.pend_ages) and self.update_step == other.update_step
            and self.initialized == other.initialized and self.ltm_age_dtype == other.ltm_age_dtype
            and torch.equal(self.generator.get_state(), other.generator.get_state())
        )

    # ------------------------------------------------------------------ §4: STM drop + write
    def keep_count(self) -> int:
        """STM rows an update keeps (of N): N - K for M+; the official MemoryLLM drop_memory's
        N - int(N * (1 / num_blocks))."""
        N = self.cfg.N
        return N - self.cfg.K if self.cfg.is_mplus else N - int(N * (1 / self.cfg.num_blocks))

    def draw_drops(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``randperm(N)`` per layer in layer order (the RNG contract, §9) → keep [L, N-Kd], drop [L, Kd]."""
        N, n_keep = self.cfg.N, self.keep_count()
        keeps, drops = [], []
        for _ in range(self.L):
            perm = torch.randperm(N, generator=self.generator)
            keeps.append(torch.sort(perm[:n_keep]).values)
            drops.append(torch.sort(perm[n_keep:]).values)
        return torch.stack(keeps), torch.stack(drops)

    def write_stm(self, delta: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """STM_l ← [STM_l[keep], delta_l]; ages ← [ages[keep], K-1..0]. Returns dropped rows and ages."""
        K = delta.shape[1]
        li = torch.arange(self.L)[:, None]
        dropped, dropped_age = self.stm[li, drop], self.stm_ages[li, drop]
        new_age = torch.arange(K - 1, -1, -1, dtype=torch.float64).expand(self.L, K)
        self.stm = torch.cat([self.stm[li, keep], delta.to(self.stm.dtype)], dim=1)
        self.stm_ages = torch.cat([self.stm_ages[li, keep], new_age], dim=1)
        return dropped, dropped_age

    def tile_first_update(self, delta: torch.Tensor) -> None:
        """MemoryLLM with ``initialized == 0``: the delta is tiled to fill the pool (no drop draws)."""
        N, n = self.cfg.N, delta.shape[1]
        if n < N:
            parts = [delta] * (N // n)
            if N % n:
                parts.append(delta[:, -(N % n):])
            delta = torch.cat(parts, dim=1)
        else:
            delta = delta[:, -N:]
        self.stm = delta.to(self.stm.dtype).clone()
        self.stm_ages = torch.zeros(self.L, N, dtype=torch.float64)
        self.initialized = True

    # ------------------------------------------------------------------ §5: pending, ages, merge
    def append_pending(self, dropped: torch.Tensor, dropped_keys: torch.Tensor, dropped_age: torch.Tensor) -> bool:
        """Ages += K for LTM and old pending, append the new batch, merge every F updates. Returns merged?"""
        K = self.cfg.K
        self.ltm_ages = [a + K for a in self.ltm_ages]
        if self.pend_vals is None:
            self.pend_vals, self.pend_keys, self.pend_ages = dropped, dropped_keys, dropped_age.clone()
        else:
            self.pend_ages = self.pend_ages + K
            self.pend_vals = torch.cat([self.pend_vals, dropped], dim=1)
            self.pend_keys = torch.cat([self.pend_keys, dropped_keys], dim=1)
            self.pend_ages = torch.cat([self.pend_ages, dropped_age], dim=1)
        self.update_step += K
        if self.update_step >= self.cfg.update_ltm_frequency * K:
            self.merge()
            return True
        return False

    def merge(self) -> None:
        """`update_ltm` (spec §5.3): append pending with rf=RF0, rf -= DEC, evict rf<=0.01 only if more
        than K0 survive (else undo the decrement). Recall frequencies are never incremented (§11.4)."""
        rf0, dec, K0 = float(self.cfg.initial_rf_when_moving_stm_to_ltm), float(self.cfg.decay_frequency), self.cfg.K0
        for l in range(self.L):
            vals = torch.cat([self.ltm[l], self.pend_vals[l].to(self.ltm[l].dtype)])
            keys = torch.cat([self.ltm_keys[l], self.pend_keys[l].to(self.ltm_keys[l].dtype)])
            ages = torch.cat([self.ltm_ages[l], self.pend_ages[l]])
            alive, rf = decay_and_evict(
                torch.cat([self.ltm_rf[l], torch.full((self.pend_vals.shape[1],), rf0, dtype=torch.float64)]), dec, K0)
            if alive is not None:
                ad = alive.to(vals.device)
                vals, keys, ages = vals[ad], keys[ad], ages[alive]
            self.ltm[l], self.ltm_keys[l], self.ltm_ages[l], self.ltm_rf[l] = vals, keys, ages, rf
            self.ltm_age_dtype[l] = "float64"
        self.pend_vals = self.pend_keys = self.pend_ages = None
        self.update_step = 0


def decay_and_evict(rf: torch.Tensor, dec: float, K0: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The eviction rule of `update_ltm` (spec §5.3) on one layer's recall frequencies (merged rows, then
    the new rows at RF0): rf -= DEC; keep rf > 0.01 only if more than K0 survive, else undo the decrement.
    Returns (keep mask or None when nothing is evicted, the new rf of the kept rows). Shared by
    ``MemoryState.merge`` and the runtime's in-place LTM store, so both evict bit-identically."""
    rf = rf - dec
    alive = rf > 0.01
    if int(alive.sum()) > K0:
        return alive, rf[alive]
    return None, rf + dec
