"""A hidden-state ``MemoryState`` (checkpoint / artifact initial memory) converted once into a ``HostMemory``
(spec R2): STM, LTM and pending rows projected chunk by chunk, through the engine's ``project`` (the
``memory_project`` graph), straight into the host buffers."""
from __future__ import annotations

from typing import Callable

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import MemoryState

from .memory import HostMemory, HostState, new_store

# project(rows [L, n, d]) -> (keys [L, n, d_r] | None, k [L, Hkv, n, Dh], v [L, Hkv, n, Dh])
Project = Callable[[torch.Tensor], tuple]

PROJECT_CHUNK = 4096  # rows per memory_project call when converting a whole STM / LTM at load


def _project_into(project: Project, rows: torch.Tensor, cfg: MPlusConfig, chunk: int = PROJECT_CHUNK):
    """``project`` over rows [L, n, d] in chunks, written into preallocated outputs (no concatenation)."""
    L, n = rows.shape[:2]
    H, D, dr = cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
    if n == 0:
        z = torch.zeros(L, H, 0, D, dtype=rows.dtype)
        return torch.zeros(L, 0, dr, dtype=rows.dtype), z, z.clone()
    keys = k = v = None
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        kk, kc, vc = project(rows[:, a:b].contiguous())
        if k is None:
            k = torch.empty(L, H, n, D, dtype=kc.dtype)
            v = torch.empty(L, H, n, D, dtype=vc.dtype)
            keys = None if kk is None else torch.empty(L, n, dr, dtype=kk.dtype)
        k[:, :, a:b], v[:, :, a:b] = kc, vc
        if keys is not None:
            keys[:, a:b] = kk
    return keys, k, v


def from_hidden(cfg: MPlusConfig, mem: MemoryState, project: Project,
                max_ltm_rows: int | None = None) -> HostMemory:
    """Convert a hidden-state ``MemoryState`` (checkpoint / artifact initial memory) once (R2): the
    STM, LTM and pending rows are projected chunk by chunk straight into the buffers."""
    g = torch.Generator(device="cpu")
    g.set_state(mem.generator.get_state())
    st = HostState(cfg, mem.stm.clone(), mem.stm_ages.clone(), None, g, mem.update_step, mem.initialized,
                   mem.version, mem.short_chunk_warned, mem.ltm_age_dtype)
    stm_keys, stm_k, stm_v = _project_into(project, st.stm, cfg)
    if not cfg.is_mplus:
        return HostMemory(cfg, st, stm_k, stm_v, None)
    L, d = st.L, mem.stm.shape[2]
    merged, n_p = [int(t.shape[0]) for t in mem.ltm], mem.n_pending
    store = new_store(cfg, L, stm_k.dtype, merged, n_p, max_ltm_rows)
    if len(set(merged)) == 1:  # the usual case: one projection for all layers
        for a in range(0, merged[0], PROJECT_CHUNK):
            b = min(a + PROJECT_CHUNK, merged[0])
            _, k, v = project(torch.stack([mem.ltm[l][a:b] for l in range(L)]))
            store.k[:, :, a:b], store.v[:, :, a:b] = k, v
    else:  # per-layer sizes differ (spec §2): layer l's rows in an [L, n, d] batch, zeros elsewhere
        for l in range(L):
            for a in range(0, merged[l], PROJECT_CHUNK):
                b = min(a + PROJECT_CHUNK, merged[l])
                rows = torch.zeros(L, b - a, d, dtype=mem.ltm[l].dtype)
                rows[l] = mem.ltm[l][a:b]
                _, k, v = project(rows)
                store.k[l, :, a:b], store.v[l, :, a:b] = k[l], v[l]
    for l in range(L):
        m = merged[l]
        store.keys[l, :m] = mem.ltm_keys[l]
        store.ages[l, :m] = mem.ltm_ages[l]
        store.rf[l, :m] = mem.ltm_rf[l]
    for a in range(0, n_p, PROJECT_CHUNK):
        b = min(a + PROJECT_CHUNK, n_p)
        _, k, v = project(mem.pend_vals[:, a:b].contiguous())
        for l in range(L):
            m = merged[l]
            store.k[l, :, m + a: m + b], store.v[l, :, m + a: m + b] = k[l], v[l]
            store.keys[l, m + a: m + b] = mem.pend_keys[l, a:b]
            store.ages[l, m + a: m + b] = mem.pend_ages[l, a:b]
    store.set_lengths(merged, [m + n_p for m in merged])
    st.store = store
    return HostMemory(cfg, st, stm_k, stm_v, stm_keys)
