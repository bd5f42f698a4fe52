"""Torch backend on CUDA against the CPU reference (run on the lent GPU machine: ``-m gpu``)."""
import warnings

import pytest
import torch

from mplus_deploy.runtime import Engine

from .conftest import chunks, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")]


@pytest.mark.parametrize("kind", ["tiny", "tiny-memoryllm"])
def test_torch_cuda_engine_matches_cpu_reference(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model(kind)
    ref.memory.seed(11)
    eng = Engine(tiny_model(kind), backend="torch", device="cuda", seed=11)
    assert eng.describe()["device"] == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(12):
            ref.inject(ids)
            eng.memorize(ids, progress=False)
    st = eng.host_memory.state
    torch.testing.assert_close(st.stm, ref.memory.stm, atol=1e-4, rtol=1e-4)
    assert torch.equal(st.stm_ages, ref.memory.stm_ages)
    assert torch.equal(st.generator.get_state(), ref.memory.generator.get_state())
    if kind == "tiny":
        assert all(torch.equal(a, b) for a, b in zip(st.ltm_ages, ref.memory.ltm_ages))
        assert all(torch.equal(a, b) for a, b in zip(st.ltm_rf, ref.memory.ltm_rf))
    p = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(eng.generate_ids(p, max_new_tokens=24, stop_at_eos=False),
                      ref.generate(p, max_new_tokens=24, stop_at_eos=False))
    # a second session on the GPU runner: its own memory moves (as the CPU reference's does), the engine's not
    before = eng.host_memory.clone()  # a copy: ``st`` above is the live state, comparing it would be vacuous
    s = eng.session(seed=2)
    ref2 = tiny_model(kind)
    ref2.memory.seed(2)
    ids = chunks(1, seed=3)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.memorize(ids, progress=False)
        ref2.inject(ids)
    assert eng.host_memory.equal(before)
    assert not s.host_memory.state.equal(before.state)
    torch.testing.assert_close(s.host_memory.state.stm, ref2.memory.stm, atol=1e-4, rtol=1e-4)
    assert torch.equal(s.host_memory.state.stm_ages, ref2.memory.stm_ages)
    assert s.memory["update_step"] == ref2.memory.update_step and s.memory["ltm_rows"] == ref2.memory.stats()["ltm_rows"]
    assert torch.equal(s.generate_ids(p, max_new_tokens=12, stop_at_eos=False),
                       ref2.generate(p, max_new_tokens=12, stop_at_eos=False))
