"""Engine(backend="torch") against the MPlus reference: same seed + same memorize ids ⇒ same memory
state and the same greedy tokens."""
import numpy as np
import pytest
import torch

from mplus_deploy.runtime import Engine

from .conftest import chunks, tiny_model


def _memorize_both(ref, eng, docs):
    for ids in docs:
        ref.inject(ids)
        eng.memorize(ids, progress=False)


@pytest.mark.parametrize("kind", ["tiny", "tiny-memoryllm"])
def test_engine_matches_reference(kind):
    ref = tiny_model(kind)
    eng = Engine(tiny_model(kind), backend="torch", seed=11)
    ref.memory.seed(11)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 256, (10,), generator=g)
    with pytest.warns(UserWarning, match="trained on chunks"):
        _memorize_both(ref, eng, chunks(12))
    st = eng.host_memory.state
    assert torch.equal(ref.memory.stm, st.stm) and torch.equal(ref.memory.stm_ages, st.stm_ages)
    assert torch.equal(ref.memory.generator.get_state(), st.generator.get_state())
    if kind == "tiny":
        assert [t.shape[0] for t in ref.memory.ltm] == eng.memory["ltm_rows"]
        assert all(torch.equal(a, b) for a, b in zip(ref.memory.ltm_ages, st.ltm_ages))
        assert all(torch.equal(a, b) for a, b in zip(ref.memory.ltm_rf, st.ltm_rf))
        assert eng.memory["update_step"] == ref.memory.update_step
        # Same retrieved rows per layer as the reference.
        out = eng.runner.infer("prefill", {"ids": prompt, **eng.host_memory.prefill_feeds()})
        for a, b in zip(out["retrieved"], ref.retrieved_indices(prompt)):
            assert torch.equal(a, b)
        torch.testing.assert_close(out["logits"], ref.prefill_logits(prompt), atol=1e-4, rtol=1e-4)
    want = ref.generate(prompt, max_new_tokens=24, stop_at_eos=False)
    got = eng.generate_ids(prompt, max_new_tokens=24, stop_at_eos=False)
    assert torch.equal(want, got)


def test_memorize_input_forms_and_chunking():
    ref = tiny_model()
    ids = chunks(1, lengths=(70,))[0]
    a = Engine(tiny_model(), backend="torch", seed=3)
    b = Engine(tiny_model(), backend="torch", seed=3)
    c = Engine(tiny_model(), backend="torch", seed=3)
    a.memorize(ids, progress=False)  # capped at max_chunk=32: 32 + 32 + 6
    b.memorize(ids.numpy(), chunk_size=32, progress=False)
    c.memorize(ids.tolist(), chunk_size=None, progress=False)
    ref.memory.seed(3)
    with pytest.warns(UserWarning):
        ref.inject(ids)  # MPlus chunks at max_chunk too
    for e in (a, b, c):
        assert torch.equal(e.host_memory.state.stm, ref.memory.stm)
    d = Engine(tiny_model(), backend="torch", seed=3)
    d.memorize(ids, chunk_size=10, progress=False)
    assert d.memory["update_step"] == 7 * 8 % (3 * 8)  # 7 updates, merges every 3
    assert not torch.equal(d.host_memory.state.stm, ref.memory.stm)


def test_sampling_is_reproducible_with_seed():
    eng = Engine(tiny_model(), backend="torch")
    p = [5, 6, 7, 8, 9]
    a = eng.generate_ids(p, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1)
    b = eng.generate_ids(p, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1)
    ref = tiny_model().generate(p, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=50, seed=1,
                                stop_at_eos=True)
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_generation_does_not_change_memory():
    eng = Engine(tiny_model(), backend="torch", seed=0)
    eng.memorize(np.arange(40) % 256, progress=False)
    before = eng.host_memory.clone()
    eng.generate_ids([1, 2, 3], max_new_tokens=5)
    assert eng.host_memory.equal(before)


def test_reset_memory_restores_initial_state_and_seed():
    eng = Engine(tiny_model(), backend="torch", seed=5)
    first = eng.host_memory.clone()
    eng.memorize(chunks(1)[0], progress=False)
    eng.reset_memory()
    assert eng.host_memory.equal(first)
    assert eng.memory["ltm_rows"] == [24, 24] and eng.memory["stm_fill"] == 0.0
