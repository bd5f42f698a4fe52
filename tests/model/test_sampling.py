"""``SamplingParams`` (one sampling object for the reference, the Engine and the CLIs) and ``decode_loop``
(the one decode loop): validation, option merging, and the loop's stop rules."""
import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model.sampling import SamplingParams, decode_loop


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
])
def test_bad_parameters_are_refused_on_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_of_merges_options_over_params_and_names_unknown_ones():
    base = SamplingParams(max_new_tokens=9, do_sample=True, top_k=5, seed=3)
    assert SamplingParams.of(base) is base
    assert SamplingParams.of(base, 4, top_p=0.5) == SamplingParams(4, True, 1.0, 0.5, 5, 3, True)
    assert SamplingParams.of(None).max_new_tokens == 256
    assert SamplingParams.of(None, default_max_new_tokens=32).max_new_tokens == 32
    assert SamplingParams.of(base, default_max_new_tokens=32).max_new_tokens == 9  # params' own value wins
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['top_q'\]"):
        SamplingParams.of(None, top_q=0.9)
    with pytest.raises(TypeError, match="SamplingParams"):
        SamplingParams.of({"max_new_tokens": 3})


def _scripted(first_tok: int, toks: list[int], vocab: int = 10):
    """Logits whose argmax is the next scripted token; records the tokens each step was fed."""
    fed = []
    seq = iter(toks)

    def one_hot(t):
        x = torch.randn(vocab) * 0.1
        x[t] = 5.0
        return x

    return (lambda: one_hot(first_tok)), (lambda tok: (fed.append(tok), one_hot(next(seq)))[1]), fed


def test_decode_loop_stops_at_eos_or_max_and_feeds_each_token_back():
    first, step, fed = _scripted(4, [7, 2, 6, 6])
    assert list(decode_loop(first, step, SamplingParams(max_new_tokens=10), eos={2})) == [4, 7, 2]
    assert fed == [4, 7]  # no step after eos
    first, step, fed = _scripted(4, [7, 2, 6, 6])
    assert list(decode_loop(first, step, SamplingParams(max_new_tokens=4, stop_at_eos=False), eos={2})) == [4, 7, 2, 6]
    assert fed == [4, 7, 2]  # exactly max_new_tokens, no step after the last
    calls = []
    assert list(decode_loop(lambda: calls.append(1), step, SamplingParams(max_new_tokens=0), eos=())) == []
    assert calls == []  # no prefill for zero tokens


def test_reference_accepts_params_and_keywords_alike():
    m = MPlus.from_config(preset("tiny"), seed=0)
    ids = torch.randint(0, 256, (6,))
    sp = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=5)
    a = m.generate(ids, params=sp)
    b = m.generate(ids, 8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=5)
    c = m.generate(ids, params=SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=6))
    assert torch.equal(a, b) and a.numel() == 8 and not torch.equal(a, c)
