"""One IOBinding per decode generation (runtime/backends/ort_binding.py): bound once, reused by the steps, freed
with the generation's buffers, never shared between generations; each step's logits are its own tensor."""
import gc

import torch

from mplus_deploy.model.sampling import SamplingParams
from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.generate import token_stream


def _stream(e, prompt, n=6):
    return token_stream(e.runner, e.config.prefix_len, e.host_memory.prefill_feeds(), prompt,
                        SamplingParams(n, stop_at_eos=False))


def _prompts(e):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, e.config.vocab_size, (n,), generator=g) for n in (5, 9)]


def test_a_generation_binds_once_and_frees_its_binding(tiny_artifact, monkeypatch):
    e = Engine(tiny_artifact, seed=0)
    sess = e.runner._sessions["decode"]
    made = []
    real = sess.io_binding
    monkeypatch.setattr(sess, "io_binding", lambda: made.append(1) or real())
    it = _stream(e, _prompts(e)[0], n=8)
    toks = [next(it) for _ in range(4)]  # prefill + 3 decode steps
    assert len(e.runner._bindings) == 1 and len(made) == 1  # the steps share one binding
    toks += list(it)
    assert len(toks) == 8 and len(made) == 1
    del it
    gc.collect()
    assert len(e.runner._bindings) == 0  # the finished generation's buffers (and binding) are gone
    e.close()


def test_interleaved_generations_on_one_runner_keep_their_own_cache(tiny_artifact):
    """Two generations stepping alternately on one runner (as two streams of one server thread) give the tokens
    each gives alone, and the same tokens as the exported attention."""
    e, ref = Engine(tiny_artifact, seed=0), Engine(tiny_artifact, seed=0, attention="graph")
    a, b = _prompts(e)
    alone = [list(_stream(e, p)) for p in (a, b)]
    assert alone == [list(_stream(ref, p)) for p in (a, b)]
    sa, sb = _stream(e, a), _stream(e, b)
    got = [[], []]
    for _ in range(6):
        got[0].append(next(sa))
        got[1].append(next(sb))
        assert len(e.runner._bindings) <= 2
    assert got == alone
    e.close()
    ref.close()


def test_each_step_returns_its_own_logits(tiny_artifact):
    e = Engine(tiny_artifact, seed=0)
    P = e.config.prefix_len
    from mplus_deploy.runtime.kvcache import BufferCache

    out = e.runner.infer("prefill", {"ids": torch.tensor([5, 6, 7]), **e.host_memory.prefill_feeds()})
    cache = BufferCache(out["present_k"], out["present_v"], P, place=e.runner.place)
    logits = []
    for i, tok in enumerate([9, 4, 11]):
        o = e.runner.infer("decode", {"ids": torch.tensor([tok]), "pos": torch.tensor(P + 3 + i), **cache.feeds()},
                           keep=cache.keep)
        cache.advance(o)
        logits.append((o["logits"], o["logits"].clone()))
    assert all(torch.equal(kept, copy) for kept, copy in logits)  # later steps wrote into new tensors
    assert not torch.equal(logits[0][0], logits[1][0])
    e.close()
