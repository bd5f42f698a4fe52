"""``precision.upcast_compute`` (bf16 storage, fp32 math): a bf16 model computes what an fp32 model whose
weights (and memory) are the bf16-rounded values computes, without ever holding fp32 weights.

The reference ``ref`` is the bf16 model cast back to fp32 (bf16 -> fp32 is exact). Memory written by the
bf16 model is stored in bf16 (its own dtype), so after each update the reference's memory is re-synced to
the bf16 model's and the next step compares the arithmetic only.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model import forward as F_
from mplus_deploy.model import precision

REL = 1e-5  # fp32 vs fp32 on identical values: only summation order may differ


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def _ids(n: int, seed: int, V: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def _memory_to_fp32(mem):
    m = mem.clone()
    f = lambda t: None if t is None else t.float()  # noqa: E731
    m.stm = f(m.stm)
    m.ltm = [f(t) for t in m.ltm]
    m.ltm_keys = [f(t) for t in m.ltm_keys]
    m.pend_vals, m.pend_keys = f(m.pend_vals), f(m.pend_keys)
    m.touch()
    return m


def _sync(ref: MPlus, bf: MPlus) -> None:
    ref.memory = _memory_to_fp32(bf.memory)
    ref._kv = None


@pytest.fixture()
def pair():
    """(bf16 model under upcast_compute, fp32 model on the same bf16-rounded weights and memory)."""
    base = MPlus.from_config(preset("tiny"), seed=5)
    bf = copy.deepcopy(base).to(torch.bfloat16)
    ref = copy.deepcopy(bf).to(torch.float32)
    for (n, p), (n2, q) in zip(bf.named_parameters(), base.named_parameters()):
        assert n == n2 and p.dtype == torch.bfloat16
        assert not torch.equal(p.float(), q), n  # the rounding is real (random fp32 weights)
    precision.upcast_compute(bf)
    bf.memory.seed(11)
    ref.memory.seed(11)
    return bf, ref


def test_dtype_reports_compute_and_weights_stay_bf16(pair):
    bf, ref = pair
    assert bf.dtype == torch.float32 and bf.compute_dtype == torch.float32
    bf.prefill_logits(_ids(7, 0, bf.config.vocab_size))
    bf.inject(_ids(24, 1, bf.config.vocab_size))
    params = dict(bf.named_parameters(remove_duplicate=False))
    assert params and all(p.dtype == torch.bfloat16 for p in params.values()), \
        {n: p.dtype for n, p in params.items() if p.dtype != torch.bfloat16}
    assert bf.memory.stm.dtype == torch.bfloat16  # the memory stays in its dtype too
    assert all(t.dtype == torch.bfloat16 for t in bf.memory.ltm)


def test_prefill_logits_equal_fp32_on_rounded_weights(pair):
    bf, ref = pair
    V = bf.config.vocab_size
    for seed, T in ((0, 5), (1, 19), (2, 40)):
        ids = _ids(T, seed, V)
        got, want = bf.prefill_logits(ids), ref.prefill_logits(ids)
        assert got.dtype == torch.float32
        assert rel(got, want) <= REL, (T, rel(got, want))
        got0, want0 = bf.prefill_logits(ids, use_memory=False), ref.prefill_logits(ids, use_memory=False)
        assert rel(got0, want0) <= REL, (T, rel(got0, want0))


def test_inject_deltas_and_memory_equal(pair):
    bf, ref = pair
    cfg = bf.config
    merged = False
    for step in range(4):  # update_ltm_frequency=3: the 3rd update merges pending rows into the LTM
        ids = _ids(24, 100 + step, cfg.vocab_size)
        d_bf, d_ref = F_.inject_forward(bf, bf.memory, ids), F_.inject_forward(ref, ref.memory, ids)
        assert d_bf.dtype == torch.float32  # computed in fp32, stored in bf16 by write_delta
        assert rel(d_bf, d_ref) <= REL, (step, rel(d_bf, d_ref))
        bf.write_delta(d_bf)
        ref.write_delta(d_ref)
        mb, mr = bf.memory, ref.memory
        assert mb.stm.dtype == torch.bfloat16
        # the stored rows are the fp32 rows rounded to bf16: equal except a rounding flip at a tie
        want = mr.stm.to(torch.bfloat16).float()
        diff = (mb.stm.float() - want).abs()
        assert float(diff.max()) <= 2 ** -7 * float(want.abs().max()), step
        assert float((diff == 0).float().mean()) >= 0.99, step
        if mb.pend_keys is not None:
            assert rel(mb.pend_keys, mr.pend_keys) <= REL, step  # keys of the dropped (bf16) rows, fp32 math
        if mb.update_step == 0:
            merged = True
            for l in range(cfg.num_hidden_layers):
                assert mb.ltm[l].shape == mr.ltm[l].shape
                assert torch.equal(mb.ltm[l].float(), mr.ltm[l])  # dropped rows came from the synced bf16 STM
                assert rel(mb.ltm_keys[l].float(), mr.ltm_keys[l].to(torch.bfloat16).float()) <= 2 ** -7
                assert torch.equal(mb.ltm_ages[l], mr.ltm_ages[l])
        _sync(ref, bf)
    assert merged


def test_generate_tokens_equal(pair):
    bf, ref = pair
    V = bf.config.vocab_size
    bf.inject(_ids(32, 7, V))
    _sync(ref, bf)
    for seed in (0, 1):
        ids = _ids(9, 50 + seed, V)
        got = bf.generate(ids, max_new_tokens=12, stop_at_eos=False)
        want = ref.generate(ids, max_new_tokens=12, stop_at_eos=False)
        assert got.tolist() == want.tolist()
        assert len(set(got.tolist())) > 1  # not a degenerate constant continuation


@pytest.fixture()
def spy_linear(monkeypatch):
    """Records the weight rows of every F.linear call made through ``precision._linear``."""
    rows: list[int] = []
    orig = F.linear

    def spy(x, w, *a, **k):
        rows.append(int(w.shape[0]))
        return orig(x, w, *a, **k)

    monkeypatch.setattr(precision.F, "linear", spy)
    return rows


def test_linear_row_blocks_equal_unchunked(monkeypatch, spy_linear):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 64, generator=g)
    whole = F.linear(x, w.float())
    monkeypatch.setattr(precision, "CHUNK_BYTES", 96 * 64 * 4)  # 96 fp32 rows per block; 1000 = 10 x 96 + 40
    spy_linear.clear()
    got = precision._linear(x, w)
    assert spy_linear == [96] * 10 + [40]
    assert w.dtype == torch.bfloat16
    assert rel(got, whole) <= 1e-6
    monkeypatch.setattr(precision, "CHUNK_BYTES", 1 << 30)
    spy_linear.clear()
    assert rel(precision._linear(x, w), whole) <= 1e-6 and spy_linear == [1000]


def test_model_with_chunked_lm_head_equals_unchunked(pair, monkeypatch, spy_linear):
    bf, ref = pair
    V, d = bf.config.vocab_size, bf.config.hidden_size
    assert bf.lm_head.weight.numel() * 4 > 4096
    ids = _ids(11, 9, V)
    whole = bf.prefill_logits(ids)
    assert max(spy_linear) == V  # unchunked: the lm_head is one product
    monkeypatch.setattr(precision, "CHUNK_BYTES", 4096)  # 16 rows of 64 fp32
    step = 4096 // (d * 4)
    spy_linear.clear()
    chunked = bf.prefill_logits(ids)
    assert spy_linear.count(step) >= V // step  # the lm_head ran in row blocks
    assert max(spy_linear) < V
    assert rel(chunked, whole) <= 1e-6
    assert rel(chunked, ref.prefill_logits(ids)) <= REL
    assert bf.lm_head.weight.dtype == torch.bfloat16
