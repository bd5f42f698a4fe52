"""Host memory manager (K/V form, in-place LTM store) against the reference ``MemoryState`` (hidden form)
and against the pre-store code path (``MemoryState`` holding packed K/V rows + feeds rebuilt per query)."""
import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model.memory import MemoryState
from mplus_deploy.runtime.backends.torch_runner import TorchRunner
from mplus_deploy.runtime.memory_convert import from_hidden
from mplus_deploy.runtime.memory import HostMemory, LtmStore, compact_, compact_layers_, pack_kv, unpack_kv

from .conftest import reference_kv, tiny_model


def _write(hm, delta, project):
    """One update as the engine makes it: project the new rows, hand the tensors to the memory."""
    return hm.write(delta, project(delta))


def _project(runner):
    def project(rows):
        out = runner.infer("memory_project", {"rows": rows})
        return out.get("keys"), out["k"], out["v"]
    return project


def _check_same(ref, hm: HostMemory, model, atol=1e-5):
    rs, hs = ref.memory, hm.state
    cfg = model.config
    # Exact bookkeeping.
    assert torch.equal(rs.stm, hs.stm)
    assert torch.equal(rs.stm_ages, hs.stm_ages)
    assert rs.update_step == hs.update_step
    assert rs.n_pending == hs.n_pending
    assert rs.ltm_age_dtype == hs.ltm_age_dtype
    assert torch.equal(rs.generator.get_state(), hs.generator.get_state())
    assert len(hs.ltm_ages) == len(hs.ltm_rf) == cfg.num_hidden_layers
    for l in range(cfg.num_hidden_layers):
        assert rs.ltm[l].shape[0] == hs.ltm_rows[l]
        assert torch.equal(rs.ltm_ages[l], hs.ltm_ages[l])
        assert torch.equal(rs.ltm_rf[l], hs.ltm_rf[l])
    if rs.pend_ages is not None:
        assert torch.equal(rs.pend_ages, hs.pend_ages)
    # K/V form equals the projection of the reference's hidden rows (rounding level: other batch shapes).
    s = hm.store
    for l in range(cfg.num_hidden_layers):
        k, v = reference_kv(model, rs.stm[l], l)
        torch.testing.assert_close(hm.stm_k[l], k, atol=atol, rtol=1e-5)
        torch.testing.assert_close(hm.stm_v[l], v, atol=atol, rtol=1e-5)
        m = s.merged[l]
        k, v = reference_kv(model, rs.ltm[l], l)
        torch.testing.assert_close(s.k[l, :, :m], k, atol=atol, rtol=1e-5)
        torch.testing.assert_close(s.v[l, :, :m], v, atol=atol, rtol=1e-5)
        torch.testing.assert_close(hs.ltm_keys[l], rs.ltm_keys[l], atol=atol, rtol=1e-5)
        if rs.pend_vals is not None:
            k, v = reference_kv(model, rs.pend_vals[l], l)
            torch.testing.assert_close(s.k[l, :, m: s.valid[l]], k, atol=atol, rtol=1e-5)
            torch.testing.assert_close(s.v[l, :, m: s.valid[l]], v, atol=atol, rtol=1e-5)
            torch.testing.assert_close(hs.pend_keys[l], rs.pend_keys[l], atol=atol, rtol=1e-5)


def test_host_memory_matches_memory_state_through_merges_and_evictions():
    # rf 1 / 2: layer 0's checkpoint rows are evicted at the 1st merge, layer 1's at the 2nd (per-layer sizes differ).
    ref = tiny_model(ltm_rf=[1.0, 2.0])
    cfg = ref.config
    runner = TorchRunner(tiny_model(ltm_rf=[1.0, 2.0])).activate()
    project = _project(runner)
    ref.memory.seed(7)
    hm = from_hidden(cfg, ref.memory, project)
    assert hm.state.generator.get_state().equal(ref.memory.generator.get_state())
    _check_same(ref, hm, ref)
    g = torch.Generator().manual_seed(3)
    merges, sizes = 0, []
    for _ in range(11):
        delta = torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)
        ref.write_delta(delta.clone())
        merges += _write(hm, delta.clone(), project)
        sizes.append(tuple(hm.state.ltm_rows))
        _check_same(ref, hm, ref)
    assert merges == 3
    assert sizes[2] == (24, 48) and sizes[5] == (48, 48)  # evictions happened, per layer
    assert hm.stats()["stm_fill"] > 0.9



def test_stm_slot_layout_keeps_hidden_rows_unmoved_until_read():
    """Updates write the K new hidden rows into the dropped rows' slots (nothing else moves) and record the
    logical order; ``mem_tail`` reads the last K logical rows without ordering the rest; reading ``state.stm``
    orders them. Bit for bit the reference's STM after every step, over 14 updates without a read."""
    ref = tiny_model()
    cfg = ref.config
    project = _fake_project(cfg)
    ref.memory.seed(5)
    hm = from_hidden(cfg, ref.memory, project)
    phys = hm.state._stm
    g = torch.Generator().manual_seed(4)
    for step in range(14):
        delta = torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)
        ref.write_delta(delta.clone())
        _write(hm, delta.clone(), project)
        assert hm.state._order is not None and hm.state._stm is phys  # no reordering, no new buffer
        assert torch.equal(hm.mem_tail(), ref.memory.stm[:, -cfg.K:])
        assert torch.equal(hm.mem_tail(), delta)  # the tail is the last update's rows
    unmoved = phys.clone()
    assert not torch.equal(unmoved, ref.memory.stm)  # slots really are out of logical order before the read
    assert torch.equal(hm.state.stm, ref.memory.stm) and hm.state._order is None and hm.state._stm is phys
    keys, k, v = project(ref.memory.stm)  # the K/V rows stayed in slot order (compacted as before)
    for got, want in ((hm.stm_keys, keys), (hm.stm_k, k), (hm.stm_v, v)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(hm.state.stm_ages, ref.memory.stm_ages)


# ------------------------------------------------------------------------------ the pre-store code path
def _fake_project(cfg, seed=0):
    """A deterministic stand-in for memory_project (fixed random linear maps per layer), fast and exact."""
    g = torch.Generator().manual_seed(seed)
    L, d, H, D, dr = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
    wk, wv, wr = (torch.randn(L, d, n, generator=g) / d ** 0.5 for n in (H * D, H * D, dr))

    def project(rows):
        n = rows.shape[1]
        kv = [torch.bmm(rows, w).view(L, n, H, D).transpose(1, 2).contiguous() for w in (wk, wv)]
        return torch.bmm(rows, wr), kv[0], kv[1]
    return project


class _OldHost:
    """The runtime's memory path before the LTM store (commit cc38178): a ``MemoryState`` whose ltm /
    pend_vals hold packed K/V rows, updated by the reference's own write_stm / append_pending / merge,
    and prefill feeds rebuilt by concatenation."""

    def __init__(self, cfg, mem: MemoryState, project):
        self.cfg, self.st = cfg, mem.clone()
        L = self.st.L
        self.stm_keys, self.stm_k, self.stm_v = project(self.st.stm)
        if len({t.shape[0] for t in self.st.ltm}) == 1:
            _, k, v = project(torch.stack(self.st.ltm))
            packed = pack_kv(k, v)
            self.st.ltm = [packed[l].clone() for l in range(L)]
        else:
            for l in range(L):
                x = self.st.ltm[l]
                rows = torch.zeros(L, x.shape[0], x.shape[1])
                rows[l] = x
                _, k, v = project(rows)
                self.st.ltm[l] = pack_kv(k, v)[l].contiguous()
        if self.st.pend_vals is not None:
            _, k, v = project(self.st.pend_vals)
            self.st.pend_vals = pack_kv(k, v)

    def write(self, delta, project):
        st = self.st
        keep, drop = st.draw_drops()
        new_keys, new_k, new_v = project(delta.contiguous())
        li = torch.arange(st.L)[:, None]
        k_rows, v_rows = self.stm_k.transpose(1, 2), self.stm_v.transpose(1, 2)
        dropped_kv = torch.cat([k_rows[li, drop].flatten(2), v_rows[li, drop].flatten(2)], -1)
        dropped_keys = self.stm_keys[li, drop]
        self.stm_k = torch.cat([k_rows[li, keep], new_k.transpose(1, 2)], 1).transpose(1, 2).contiguous()
        self.stm_v = torch.cat([v_rows[li, keep], new_v.transpose(1, 2)], 1).transpose(1, 2).contiguous()
        self.stm_keys = torch.cat([self.stm_keys[li, keep], new_keys], 1)
        _, dropped_age = st.write_stm(delta, keep, drop)
        merged = st.append_pending(dropped_kv, dropped_keys, dropped_age)
        st.touch()
        return merged

    def feeds(self):
        st, cfg = self.st, self.cfg
        L, H, D = st.L, cfg.num_key_value_heads, cfg.dh
        merged, n_p = [int(t.shape[0]) for t in st.ltm], st.n_pending
        S = max(merged) + n_p
        keys = torch.zeros(L, S, cfg.selector_hidden_dim)
        kv = torch.zeros(L, S, 2 * H * D)
        ages = torch.zeros(L, S, dtype=torch.int64)
        for l in range(L):
            m = merged[l]
            keys[l, :m], kv[l, :m], ages[l, :m] = st.ltm_keys[l], st.ltm[l], st.ltm_ages[l].to(torch.int64)
            if n_p:
                keys[l, m: m + n_p], kv[l, m: m + n_p] = st.pend_keys[l], st.pend_vals[l]
                ages[l, m: m + n_p] = st.pend_ages[l].to(torch.int64)
        k, v = unpack_kv(kv, H, D)
        return {"stm_k": self.stm_k, "stm_v": self.stm_v, "ltm_keys": keys, "ltm_k": k.contiguous(),
                "ltm_v": v.contiguous(), "ltm_ages": ages,
                "valid_len": torch.tensor([m + n_p for m in merged]), "merged_len": torch.tensor(merged)}


def _assert_feeds_equal(new: dict, old: dict):
    assert isinstance(new["memory_id"], int)  # names the version for backends caching device copies (torch_memory)
    assert new.keys() - {"memory_id"} == old.keys()
    assert torch.equal(new["valid_len"], old["valid_len"]) and torch.equal(new["merged_len"], old["merged_len"])
    assert torch.equal(new["stm_k"], old["stm_k"]) and torch.equal(new["stm_v"], old["stm_v"])
    for l, n in enumerate(new["valid_len"].tolist()):
        for key, dim in (("ltm_keys", 0), ("ltm_ages", 0), ("ltm_k", 1), ("ltm_v", 1)):
            a, b = new[key][l], old[key][l]
            assert a.dtype == b.dtype, key
            assert torch.equal(a.narrow(dim, 0, n), b.narrow(dim, 0, n)), (l, key)
            assert not a.narrow(dim, n, a.shape[dim] - n).any(), (l, key, "pads must stay zero")


@pytest.mark.parametrize("run_min", [0, 1 << 40])  # compaction by runs / by gathers (tiny rows pick gathers)
def test_store_feeds_equal_the_old_path_bit_exactly_over_many_merges_and_evictions(monkeypatch, run_min):
    monkeypatch.setattr("mplus_deploy.runtime.ltm_store.RUN_MIN_BYTES", run_min)
    # RF0 = 3 (a batch lives 2 merges) and checkpoint rf 1 / 2.5 per layer: per-layer evictions at the
    # 1st and 3rd merge, then the steady batch FIFO; 40 updates = 13 merges.
    cfg = preset("tiny").replace(initial_rf_when_moving_stm_to_ltm=3, ltm_initial_size=20)
    m = MPlus.from_config(cfg, seed=0)
    m.memory.ltm_rf = [torch.full((20,), r, dtype=torch.float64) for r in (1.0, 2.5)]
    m.memory.seed(5)
    project = _fake_project(cfg)
    old = _OldHost(cfg, m.memory, project)
    hm = from_hidden(cfg, m.memory, project)
    g = torch.Generator().manual_seed(11)
    merges, sizes, ptrs = 0, set(), set()
    for u in range(40):
        if u % 3 == 1:
            hm.prefill_feeds()  # queries between updates must not disturb anything
        delta = torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)
        a, b = old.write(delta.clone(), project), _write(hm, delta.clone(), project)
        assert a == b
        merges += b
        new = hm.prefill_feeds()
        _assert_feeds_equal(new, old.feeds())
        sizes.add(tuple(new["merged_len"].tolist()))
        ptrs.add(new["ltm_k"].data_ptr())
        st, os_ = hm.state, old.st
        assert torch.equal(st.stm, os_.stm) and torch.equal(st.stm_ages, os_.stm_ages)
        assert torch.equal(hm.stm_keys, old.stm_keys)
        assert st.update_step == os_.update_step and st.ltm_age_dtype == os_.ltm_age_dtype
        assert torch.equal(st.generator.get_state(), os_.generator.get_state())
        for l in range(cfg.num_hidden_layers):
            assert torch.equal(st.ltm_ages[l], os_.ltm_ages[l]) and torch.equal(st.ltm_rf[l], os_.ltm_rf[l])
            assert st.ltm_ages[l].dtype == os_.ltm_ages[l].dtype == torch.float64
    assert merges == 13
    # merge 1: layer 0's checkpoint rows go (rf 1), layer 1's stay (2.5); merge 2: no eviction in layer 1
    # (its oldest rows are at rf 0.5); merge 3 on: both layers in the steady 2-batch FIFO.
    assert sizes == {(20, 20), (24, 44), (48, 68), (48, 48)}
    assert len(ptrs) <= 2  # the buffers were reallocated at most once (growth), never per merge


def test_prefill_feeds_are_the_live_buffers():
    cfg = preset("tiny")
    m = MPlus.from_config(cfg, seed=0)
    project = _fake_project(cfg)
    hm = from_hidden(cfg, m.memory, project)
    f0 = hm.prefill_feeds()
    s = hm.store
    assert f0["ltm_k"] is s.k and f0["ltm_keys"] is s.keys and f0["ltm_ages"] is s.feed_ages
    assert f0["ltm_k"].shape[2] == s.cap >= cfg.K0 and s.cap % 256 == 0
    assert hm.prefill_feeds() is f0  # cached per version
    _write(hm, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
    f1 = hm.prefill_feeds()
    assert f1["ltm_k"].data_ptr() == f0["ltm_k"].data_ptr() and f1["stm_k"].data_ptr() == f0["stm_k"].data_ptr()
    assert int(f1["valid_len"][0]) == int(f1["merged_len"][0]) + cfg.K


@pytest.mark.parametrize("run_min", [0, 1 << 40])  # the run path / the gather path
def test_compact_matches_index_select(monkeypatch, run_min):
    monkeypatch.setattr("mplus_deploy.runtime.ltm_store.RUN_MIN_BYTES", run_min)
    g = torch.Generator().manual_seed(0)
    for n, keep in ((50, 37), (1000, 999), (64, 64), (300, 10), (2000, 1990), (4000, 2000), (500, 1)):
        for dim in (0, 1):
            t = torch.randn(3, n, 5, generator=g) if dim == 1 else torch.randn(n, 4, generator=g)
            idx = torch.sort(torch.randperm(n, generator=g)[:keep]).values
            want = t.index_select(dim, idx).clone()
            assert compact_(t, dim, idx) == keep
            assert torch.equal(t.narrow(dim, 0, keep), want)
    t = torch.arange(40.0)  # a contiguous run shifted by less than its length (overlapping source)
    assert compact_(t, 0, torch.arange(3, 40)) == 37 and torch.equal(t[:37], torch.arange(3.0, 40))
    for piece in (2, 4, 64):  # ... in pieces smaller than the shift, than the run, or whole
        monkeypatch.setattr("mplus_deploy.runtime.ltm_store.MOVE_CHUNK_BYTES", piece * 4)
        t = torch.arange(40.0)
        idx = torch.cat([torch.arange(0, 5), torch.arange(8, 30), torch.arange(33, 40)])
        assert compact_(t, 0, idx) == 34 and torch.equal(t[:34], idx.float())


@pytest.mark.parametrize("chunk", [1 << 25, 64])  # one index_select per layer / compact_ per layer
def test_compact_layers_matches_per_layer_index_select(monkeypatch, chunk):
    monkeypatch.setattr("mplus_deploy.runtime.ltm_store.MOVE_CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(1)
    L, N, n = 3, 40, 31
    keep = torch.stack([torch.sort(torch.randperm(N, generator=g)[:n]).values for _ in range(L)])
    for shape, dim in (((L, N, 6), 0), ((L, 2, N, 4), 1), ((L, N), 0)):
        t = torch.randn(*shape, generator=g)
        want = [t[l].index_select(dim, keep[l]).clone() for l in range(L)]
        compact_layers_(t, dim, keep)
        for l in range(L):
            assert torch.equal(t[l].narrow(dim, 0, n), want[l])


def test_capacity_grows_geometrically_and_respects_the_graph_bound():
    cfg = preset("tiny").replace(initial_rf_when_moving_stm_to_ltm=1000)  # nothing is ever evicted
    m = MPlus.from_config(cfg, seed=0)
    project = _fake_project(cfg)
    hm = from_hidden(cfg, m.memory, project)
    caps, ptrs = [], []
    for _ in range(300):
        _write(hm, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
        if hm.store.k.data_ptr() not in ptrs:
            ptrs.append(hm.store.k.data_ptr())
            caps.append(hm.store.cap)
    rows = hm.store.valid[0]
    assert rows == 24 + 300 * cfg.K
    assert len(caps) <= 12  # 2 424 rows appended, a handful of reallocations
    assert all(b >= 1.25 * a for a, b in zip(caps, caps[1:]))
    # The prefill graph's S bound (e.g. a TensorRT profile max) caps the padding, not the rows in use.
    hm.max_ltm_rows = rows + 8
    assert hm.store.cap == rows + 8 and hm.store.valid[0] == rows
    _write(hm, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
    assert hm.store.cap == rows + 8
    _write(hm, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
    assert hm.store.cap == rows + 16  # over the bound only by the rows themselves


def test_clone_is_independent_and_equal():
    cfg = preset("tiny")
    m = MPlus.from_config(cfg, seed=0)
    project = _fake_project(cfg)
    hm = from_hidden(cfg, m.memory, project)
    for _ in range(4):
        _write(hm, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
    c = hm.clone()
    assert c.equal(hm) and c.store.k.data_ptr() != hm.store.k.data_ptr()
    _write(c, torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size), project)
    assert not c.equal(hm)
    assert isinstance(c.store, LtmStore)
