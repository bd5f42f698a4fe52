"""Host memory manager (K/V form) against the reference ``MemoryState`` (hidden form)."""
import torch

from mplus_deploy.runtime.backends.torch_runner import TorchRunner
from mplus_deploy.runtime.memory import HostMemory, unpack_kv

from .conftest import reference_kv, tiny_model


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
    for l in range(cfg.num_hidden_layers):
        assert rs.ltm[l].shape[0] == hs.ltm[l].shape[0]
        assert torch.equal(rs.ltm_ages[l], hs.ltm_ages[l])
        assert torch.equal(rs.ltm_rf[l], hs.ltm_rf[l])
    if rs.pend_ages is not None:
        assert torch.equal(rs.pend_ages, hs.pend_ages)
    # K/V form equals the projection of the reference's hidden rows (rounding level: other batch shapes).
    for l in range(cfg.num_hidden_layers):
        k, v = reference_kv(model, rs.stm[l], l)
        torch.testing.assert_close(hm.stm_k[l], k, atol=atol, rtol=1e-5)
        torch.testing.assert_close(hm.stm_v[l], v, atol=atol, rtol=1e-5)
        k, v = reference_kv(model, rs.ltm[l], l)
        hk, hv = unpack_kv(hs.ltm[l], cfg.num_key_value_heads, cfg.dh)
        torch.testing.assert_close(hk, k, atol=atol, rtol=1e-5)
        torch.testing.assert_close(hv, v, atol=atol, rtol=1e-5)
        torch.testing.assert_close(hs.ltm_keys[l], rs.ltm_keys[l], atol=atol, rtol=1e-5)
        if rs.pend_vals is not None:
            k, v = reference_kv(model, rs.pend_vals[l], l)
            hk, hv = unpack_kv(hs.pend_vals[l], cfg.num_key_value_heads, cfg.dh)
            torch.testing.assert_close(hk, k, atol=atol, rtol=1e-5)
            torch.testing.assert_close(hs.pend_keys[l], rs.pend_keys[l], atol=atol, rtol=1e-5)


def test_host_memory_matches_memory_state_through_merges_and_evictions():
    # rf 1 / 2: layer 0's checkpoint rows are evicted at the 1st merge, layer 1's at the 2nd (per-layer sizes differ).
    ref = tiny_model(ltm_rf=[1.0, 2.0])
    cfg = ref.config
    runner = TorchRunner(tiny_model(ltm_rf=[1.0, 2.0])).activate()
    project = _project(runner)
    ref.memory.seed(7)
    hm = HostMemory.from_hidden(cfg, ref.memory, project)
    assert hm.state.generator.get_state().equal(ref.memory.generator.get_state())
    _check_same(ref, hm, ref)
    g = torch.Generator().manual_seed(3)
    merges, sizes = 0, []
    for _ in range(11):
        delta = torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)
        ref.write_delta(delta.clone())
        merges += hm.write(delta.clone(), project)
        sizes.append(tuple(t.shape[0] for t in hm.state.ltm))
        _check_same(ref, hm, ref)
    assert merges == 3
    assert sizes[2] == (24, 48) and sizes[5] == (48, 48)  # evictions happened, per layer
    assert hm.stats()["stm_fill"] > 0.9


def test_prefill_feeds_incremental_equals_rebuild():
    ref = tiny_model()
    cfg = ref.config
    runner = TorchRunner(ref).activate()
    project = _project(runner)
    hm = HostMemory.from_hidden(cfg, ref.memory, project)
    g = torch.Generator().manual_seed(0)
    for i in range(7):
        hm.prefill_feeds()  # keeps buffers between updates
        hm.write(torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g), project)
        inc = {k: v.clone() for k, v in hm.prefill_feeds().items()}
        fresh = HostMemory(cfg, hm.state, hm.stm_k, hm.stm_v, hm.stm_keys).prefill_feeds()
        assert inc.keys() == fresh.keys()
        for k in inc:
            n = int(inc["valid_len"].max())
            a, b = inc[k], fresh[k]
            if k in ("ltm_keys", "ltm_ages"):
                a, b = a[:, :n], b[:, :n]
            elif k in ("ltm_k", "ltm_v"):
                a, b = a[:, :, :n], b[:, :, :n]
            assert torch.equal(a, b), (i, k)
        assert inc["ltm_keys"].shape[1] >= cfg.K0
