"""The causal mask as an additive bias (``common.causal_bias``, issue 16): the scores it gives are exactly the
masked_fill scores, and ``attend`` with it equals ``layers.attend`` (the reference) within fp32 rounding."""
import pytest
import torch

from mplus_deploy.export import common
from mplus_deploy.model.layers import attend as reference_attend


@pytest.mark.parametrize("Q,R", [(1, 1), (1, 9), (5, 5), (7, 30), (64, 577)])
def test_bias_gives_exactly_the_masked_scores(Q, R):
    g = torch.Generator().manual_seed(Q * 1000 + R)
    scores = torch.randn(4, Q, R, generator=g)
    i, j = torch.arange(Q)[:, None], torch.arange(R)[None, :]
    want = scores.masked_fill(j > (R - Q) + i, float("-inf"))
    got = scores + common.causal_bias(Q, R, torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(torch.softmax(got, -1), torch.softmax(want, -1))


@pytest.mark.parametrize("Q,R", [(3, 11), (16, 16), (40, 97)])
def test_attend_with_a_shared_bias_matches_the_reference(Q, R):
    g = torch.Generator().manual_seed(Q + R)
    q, k, v = torch.randn(8, Q, 16, generator=g), torch.randn(2, R, 16, generator=g), torch.randn(2, R, 16, generator=g)
    bias = common.causal_bias(Q, R, torch.float32)
    got = common.attend(q, k, v, 2, bias=bias)
    assert torch.equal(got, common.attend(q, k, v, 2))  # a given bias is the one built inside
    torch.testing.assert_close(got, reference_attend(q, k, v), rtol=1e-5, atol=1e-6)
    rows = common.attend(q[:, Q - 2:], k, v, 2, bias=bias[Q - 2:])  # the last rows alone (memory_update's last layer)
    torch.testing.assert_close(rows, got[Q - 2:], rtol=1e-6, atol=1e-6)
