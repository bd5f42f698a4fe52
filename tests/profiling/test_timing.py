import numpy as np
import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.profiling import TimedRunner, fill_ltm, stats_ms
from mplus_deploy.profiling.bandwidth import decode_traffic, torch_decode_weight_bytes


def test_stats_ms():
    x = np.random.default_rng(0).exponential(1e-3, 1000)
    s = stats_ms(x)
    assert s["n"] == 1000 and s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["p50"] == pytest.approx(np.median(x) * 1e3)
    assert stats_ms([])["p50"] is None


def test_timed_runner_and_fill():
    from mplus_deploy.runtime import Engine

    eng = Engine(MPlus.from_config(preset("tiny")), backend="torch", seed=0, wrap=TimedRunner)
    timed = eng.runner
    assert isinstance(timed, TimedRunner)
    eng.generate_ids(torch.arange(3, 11), max_new_tokens=4, stop_at_eos=False)
    assert [c.graph for c in timed.calls] == ["memory_project"] * 2 + ["prefill", "decode", "decode", "decode"]  # STM, LTM at load
    assert all(c.seconds > 0 for c in timed.calls)
    s = eng.session(seed=0)
    fill_ltm(s.host_memory, 300)
    assert s.memory["ltm_rows"] == [300, 300] and s.memory["pending_rows"] == 0
    f = s.host_memory.prefill_feeds()
    assert f["ltm_keys"].shape[1] >= 300 and int(f["valid_len"][0]) == 300
    ids = eng.session(seed=0).generate_ids(torch.arange(3, 11), max_new_tokens=2)
    assert ids.numel() == 2
    assert s.generate_ids(torch.arange(3, 11), max_new_tokens=2).numel() == 2


def test_decode_traffic_counts_memory_prefix():
    cfg = preset("small")
    m = MPlus.from_config(cfg)
    w = torch_decode_weight_bytes(m)
    assert 0 < w < sum(p.numel() * 4 for p in m.parameters())
    t = decode_traffic(cfg, w, prompt_len=64, new_tokens=33, itemsize=4)
    per_row = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.dh * 4
    assert t["memory_prefix_kv_bytes"] == per_row * cfg.prefix_len
    assert t["kv_bytes"] == per_row * (cfg.prefix_len + 64 + 15.5)  # mean cache over 32 decode steps
