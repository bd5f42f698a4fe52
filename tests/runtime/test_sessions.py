"""Sessions: independent memories over one set of weights / backend objects."""
import torch

from mplus_deploy.runtime import Engine

from .conftest import chunks, tiny_model


def test_sessions_are_isolated_and_share_the_runner():
    eng = Engine(tiny_model(), backend="torch", seed=1)
    s1, s2 = eng.session(seed=1), eng.session(seed=2)
    assert s1._core.runner is eng.runner and s2._core.runner is eng.runner
    base = eng.host_memory.clone()
    s2_before = s2.host_memory.clone()
    p = [7, 8, 9, 10]
    untouched_tokens = s2.generate_ids(p, max_new_tokens=6)
    for ids in chunks(4):
        s1.memorize(ids, progress=False)
    assert eng.host_memory.equal(base)  # the engine's own (default) session did not move
    assert s2.host_memory.equal(s2_before)
    assert torch.equal(s2.generate_ids(p, max_new_tokens=6), untouched_tokens)
    assert s1.memory["update_step"] != s2.memory["update_step"] or s1.memory["ltm_rows"] != s2.memory["ltm_rows"]
    # The same inputs with the same seed give the same memory in any session; other seeds differ.
    for ids in chunks(4):
        eng.memorize(ids, progress=False)
    assert eng.host_memory.state.equal(s1.host_memory.state)
    s3 = eng.session(seed=3)
    for ids in chunks(4):
        s3.memorize(ids, progress=False)
    assert not torch.equal(s3.host_memory.state.stm, s1.host_memory.state.stm)
    # Sessions read the same tensors of the initial memory only through copies.
    s1.host_memory.state.stm.zero_()
    assert not torch.equal(eng.session().host_memory.state.stm, s1.host_memory.state.stm)
