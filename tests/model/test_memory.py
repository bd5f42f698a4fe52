"""Memory update semantics (spec §4, §5, §9) and the bad-input contract (issue 2 §6)."""
import json
import warnings

import pytest
import torch

from mplus_deploy.model import ConfigError, MPlus, MPlusConfig, preset

warnings.filterwarnings("ignore", message="injecting")


def test_seeded_drops_replay_official_randperm_stream():
    m = MPlus.from_config(preset("tiny"), seed=0)
    cfg = m.config
    stm0 = m.memory.stm.clone()
    m.memory.seed(1234)
    m.inject(torch.randint(0, 256, (12,)))
    torch.manual_seed(1234)  # the official code draws on the global CPU generator
    for l in range(cfg.num_hidden_layers):
        perm = torch.randperm(cfg.N)
        keep = torch.sort(perm[: cfg.N - cfg.K]).values
        drop = torch.sort(perm[cfg.N - cfg.K:]).values
        assert torch.equal(m.memory.stm[l, : cfg.N - cfg.K], stm0[l, keep])
        assert torch.equal(m.memory.pend_vals[l], stm0[l, drop])
    # reproducible: same seed, same inputs -> bit-identical state
    a = MPlus.from_config(preset("tiny"), seed=0)
    b = MPlus.from_config(preset("tiny"), seed=0)
    for x in (a, b):
        x.memory.seed(7)
        for i in range(4):
            x.inject(torch.arange(10 + i) % 256)
    assert a.memory.equal(b.memory)


def test_stm_write_order_and_frozen_ages():
    """Spec §4 step 5 and §5.2, against a replay of the official drop stream: per update and layer,
    ``stm_age <- concat(stm_age[keep], [K-1, ..., 0])`` with the surviving ages unchanged (frozen, never
    incremented, kept in index order), the dropped rows take their STM age into the pending cache, and
    pending and LTM ages grow by K per update."""
    m = MPlus.from_config(preset("tiny"), seed=0)
    cfg, mem = m.config, m.memory
    L, N, K = cfg.num_hidden_layers, cfg.N, cfg.K
    g = torch.Generator().manual_seed(3)
    # distinct non-zero ages (the checkpoint's are all 0): zeroed, incremented or reordered ages are visible
    mem.stm_ages = (1000 + torch.randperm(L * N, generator=g)).to(torch.float64).reshape(L, N)
    ltm0 = [a.clone() for a in mem.ltm_ages]
    mem.seed(1234)
    replay = torch.Generator().manual_seed(1234)  # = torch.manual_seed(1234) in the official code (§9)
    ages, pending = mem.stm_ages.clone(), None
    for u in range(1, 3):
        m.inject(torch.randint(3, 256, (12,), generator=g))
        new_ages, dropped = [], []
        for l in range(L):
            perm = torch.randperm(N, generator=replay)
            keep, drop = torch.sort(perm[: N - K]).values, torch.sort(perm[N - K:]).values
            new_ages.append(torch.cat([ages[l, keep], torch.arange(K - 1, -1, -1, dtype=torch.float64)]))
            dropped.append(ages[l, drop])
        ages, dropped = torch.stack(new_ages), torch.stack(dropped)
        pending = dropped if pending is None else torch.cat([pending + K, dropped], 1)
        assert torch.equal(mem.stm_ages, ages), u
        assert mem.stm_ages[:, -K:].tolist() == [list(range(K - 1, -1, -1))] * L
        if u == 1:  # only the (non-zero) initial ages survive the first update
            assert bool((mem.stm_ages[:, : N - K] >= 1000).all())
        assert torch.equal(mem.pend_ages, pending), u
        assert all(torch.equal(a, a0 + u * K) for a, a0 in zip(mem.ltm_ages, ltm0)), u
    # after two updates some rows from the first one survive with their write-time ages, still frozen
    assert set(mem.stm_ages[0, : N - K].tolist()) & set(range(K))


def test_ltm_merge_eviction_is_batch_fifo_with_steady_state():
    cfg = preset("tiny").replace(initial_rf_when_moving_stm_to_ltm=3, ltm_initial_size=20)
    m = MPlus.from_config(cfg, seed=0)
    K, F, K0 = cfg.K, cfg.update_ltm_frequency, cfg.K0
    m.memory.ltm_rf = [torch.full((20,), 1.5, dtype=torch.float64)] * 2  # initial rows: evicted at merge 2
    batches, orig_merge = [], m.memory.merge

    def recording_merge():
        batches.append(m.memory.pend_vals[0].clone())
        orig_merge()

    m.memory.merge = recording_merge
    sizes = []
    for u in range(1, 8 * F + 1):
        m.inject(torch.randint(0, 256, (12,)))
        if u % F == 0:
            sizes.append(m.memory.ltm[0].shape[0])
            assert m.memory.n_pending == 0 and m.memory.update_step == 0
            if len(batches) >= 2:  # batch FIFO: exactly the 2 most recent batches, oldest first
                assert torch.equal(m.memory.ltm[0], torch.cat(batches[-2:]))
                assert m.memory.ltm_rf[0].tolist() == [1.0] * 24 + [2.0] * 24
        else:
            assert m.memory.n_pending == (u % F) * K
    # RF0=3, DEC=1: a batch has rf 2 after its merge, 1 after the next, and is evicted at the third
    # (present for RF0-1 merges, spec §5.3). merge1: 20+24=44; merge2: the initial rows (rf 1.5)
    # are evicted -> 2 batches = 48, the steady state from then on.
    assert sizes == [44, 48, 48, 48, 48, 48, 48, 48]
    assert all(s > K0 for s in sizes)


def test_merge_keeps_everything_when_survivors_do_not_exceed_k0():
    cfg = preset("tiny").replace(initial_rf_when_moving_stm_to_ltm=1, ltm_initial_size=4)
    m = MPlus.from_config(cfg, seed=0)
    m.memory.ltm_rf = [torch.full((4,), 1.0, dtype=torch.float64)] * 2
    for _ in range(cfg.update_ltm_frequency):
        m.inject(torch.randint(0, 256, (12,)))
    # every rf hits 0 but only 0 survivors <= K0: decrement undone, nothing evicted
    assert m.memory.ltm[0].shape[0] == 4 + 24
    assert torch.all(m.memory.ltm_rf[0] == 1.0)


def test_ages_increment_by_k_per_update():
    m = MPlus.from_config(preset("tiny"), seed=0)
    a0 = m.memory.ltm_ages[0].clone()
    m.inject(torch.randint(0, 256, (12,)))
    first_pending = m.memory.pend_ages[0].clone()
    m.inject(torch.randint(0, 256, (12,)))
    assert torch.equal(m.memory.ltm_ages[0], a0 + 2 * m.config.K)
    assert torch.equal(m.memory.pend_ages[0, :8], first_pending + m.config.K)


def test_memoryllm_first_update_tiles_the_pool():
    m = MPlus.from_config(preset("tiny-memoryllm"), seed=0, initialized=False)
    g0 = m.memory.generator.get_state().clone()
    m.inject(torch.randint(0, 256, (5,)))  # 5 rows (T < K): 32 = 6*5 + last 2
    stm = m.memory.stm
    assert m.memory.initialized
    d = stm[:, :5]
    assert torch.equal(stm[:, 25:30], d) and torch.equal(stm[:, 30:], d[:, -2:])
    assert torch.equal(m.memory.generator.get_state(), g0)  # no drop drawn
    m.inject(torch.randint(0, 256, (12,)))  # initialized now: regular drop/write
    assert not torch.equal(m.memory.generator.get_state(), g0)


@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(0, dtype=torch.int64), "empty"),
    (torch.tensor([1, 2, 999]), "outside the vocabulary"),
    (torch.tensor([1.0, 2.0]), "integer"),
    (torch.tensor([[1, 2], [3, 4]]), "shape"),
])
@pytest.mark.parametrize("call", ["inject", "prefill_logits", "generate"])
def test_bad_input_is_rejected_and_memory_unchanged(bad, msg, call):
    m = MPlus.from_config(preset("tiny"), seed=0)
    m.inject(torch.randint(0, 256, (12,)))
    before = m.memory.clone()
    with pytest.raises(ValueError, match=msg):
        getattr(m, call)(bad)
    assert m.memory.equal(before)


def test_window_and_sampling_limits():
    m = MPlus.from_config(preset("tiny"), seed=0)
    before = m.memory.clone()
    with pytest.raises(ValueError, match="generation window of 64"):
        m.generate(torch.randint(0, 256, (60,)), max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.randint(0, 256, (5,)), 3, do_sample=True, temperature=0)
    assert m.memory.equal(before)


def test_empty_ltm_raises_instead_of_hanging():
    m = MPlus.from_config(preset("tiny").replace(ltm_initial_size=0), seed=0)
    with pytest.raises(ValueError, match="long-term memory is empty"):
        m.generate(torch.randint(0, 256, (5,)), 2)


def test_sampling_is_seeded_and_greedy_matches_argmax():
    m = MPlus.from_config(preset("tiny"), seed=0)
    ids = torch.randint(0, 256, (6,))
    a = m.generate(ids, 8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=5)
    b = m.generate(ids, 8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=5)
    assert torch.equal(a, b)
    g = m.generate(ids, 1)
    assert int(g[0]) == int(m.prefill_logits(ids)[-1].argmax())


def test_config_json_round_trip_and_errors(tmp_path):
    cfg = preset("tiny")
    cfg.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["num_tokens"] == 8 and d["architectures"] == ["MPlus"] and "lora_config" in d
    assert MPlusConfig.from_json(tmp_path) == cfg
    d["some_new_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="some_new_field"):
        assert MPlusConfig.from_json(tmp_path).extra == {"some_new_field": 1}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MPlusConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="not supported"):
        MPlusConfig.from_dict({**preset("tiny").to_dict(), "architectures": ["GPT2"]}).kind
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    assert preset("mplus-8b").N == 10240 and preset("mplus-8b").prefix_len == 12801
    assert preset("memoryllm-8b").N == 12800 and preset("memoryllm-8b").prefix_len == 12801
