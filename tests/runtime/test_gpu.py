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
    s = eng.session(seed=2)
    s.memorize(chunks(1)[0], progress=False)
    assert eng.host_memory.state.update_step == st.update_step
