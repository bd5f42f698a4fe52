"""export.retrieval_margin: validation memories get a clear top-K0 cut at every layer without changing which rows
any layer retrieves (the prefill graph's retrieved rows are compared exactly; near-ties made that a test of
rounding)."""
import torch

from mplus_deploy.export import prefill
from mplus_deploy.export.common import Limits
from mplus_deploy.export.prefill import random_memory
from mplus_deploy.export.retrieval_margin import TIE_MARGIN, separate
from mplus_deploy.model import forward as F_

from tests.runtime.conftest import tiny_model


def _case(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    T, S_m, n_p = prefill.validation_cases(model.config, Limits.from_config(model.config))[0]
    mem = random_memory(model, g, S_m, n_p)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=g)
    return mem, ids


def _retrieved(model, mem, ids):
    rec = []
    F_.prefill(model, mem, ids, record=rec)
    return [r.clone() for r in rec]


def test_separate_widens_every_cut_and_keeps_the_selection():
    m = tiny_model()
    mem, ids = _case(m)
    before = _retrieved(m, mem, ids)
    keys0 = [k.clone() for k in mem.ltm_keys]
    probe = separate(m, mem, ids, margin=0.0)  # margin 0: measures the gaps, changes nothing
    assert all(torch.equal(a, b) for a, b in zip(keys0, mem.ltm_keys))
    assert min(probe) < TIE_MARGIN  # the random memory had a narrow cut somewhere: the test exercises a change
    gaps = separate(m, mem, ids)
    assert len(gaps) == m.config.num_hidden_layers and min(gaps) >= TIE_MARGIN
    assert all(torch.equal(a, b) for a, b in zip(before, _retrieved(m, mem, ids)))  # the same rows, same order
    assert any(not torch.equal(a, b) for a, b in zip(keys0, mem.ltm_keys))
    again = separate(m, mem, ids)  # idempotent once separated
    assert again == gaps


def test_prefill_samples_are_separated():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    for case in prefill.validation_cases(m.config, Limits.from_config(m.config)):
        f, mem = prefill.sample(m, g, case)
        gaps = separate(m, mem, f["ids"], margin=0.0)
        assert all(x >= TIE_MARGIN for x in gaps), (case, gaps)
