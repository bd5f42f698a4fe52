import pytest
import torch

from mplus_deploy.model import retrieval as R
from mplus_deploy.plugins import exact_topk, memory_gather, topk_retrieve, topk_retrieve_chunked
from mplus_deploy.plugins.cpu import bf16_keys, bf16_scores, chunked_scores, topk_retrieve_bf16

from .conftest import make_case

K = 32


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("valid_len", [600, 451, 32, 31, 7, 1])
def test_reference_matches_model_select(seed, valid_len):
    q, keys, ages = make_case(seed)
    ref = topk_retrieve(q, keys, valid_len, ages, K)
    sel = R.select(q, keys[:valid_len], None, ages[:valid_len].double(), None, K)
    assert torch.equal(ref, sel)
    assert ref.dtype == torch.int64 and ref.shape == (K,) and int(ref.max()) < valid_len


def test_ties_are_present_and_follow_the_rule():
    q, keys, ages = make_case(0)
    s = R.mean_sigmoid_scores(q, keys)
    assert R.boundary_ties(s, K) > 1  # the case really has ties at the boundary
    idx = topk_retrieve(q, keys, 600, ages, K)
    kth = torch.sort(s, descending=True).values[K - 1]
    chosen_eq = sorted(int(i) for i in idx if s[i] == kth)
    all_eq = torch.nonzero(s == kth).flatten().tolist()
    assert chosen_eq == all_eq[: len(chosen_eq)]  # lowest indices among equal scores
    a = ages[idx]
    assert all(a[i] >= a[i + 1] for i in range(K - 1))
    for i in range(K - 1):  # equal ages: descending position in the ascending list → descending index
        if a[i] == a[i + 1]:
            assert idx[i] > idx[i + 1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("valid_len", [600, 333, 32, 5])
@pytest.mark.parametrize("chunk", [64, 100, 2048])
def test_chunked_equals_reference(seed, valid_len, chunk):
    q, keys, ages = make_case(seed)
    assert torch.equal(topk_retrieve_chunked(q, keys, valid_len, ages, K, chunk=chunk),
                       topk_retrieve(q, keys, valid_len, ages, K))


def test_chunked_random_gaussian_bitwise_scores():
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(64, 64, generator=g), torch.randn(5000, 64, generator=g)
    ages = torch.randint(0, 50, (5000,), generator=g)
    assert torch.equal(chunked_scores(q, keys, 512), R.mean_sigmoid_scores(q, keys))
    assert torch.equal(topk_retrieve_chunked(q, keys, 5000, ages, 256), topk_retrieve(q, keys, 5000, ages, 256))


def test_exact_topk_matches_model_rule():
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 20, (1000,), generator=g).float()  # heavy ties
    for k in (1, 17, 500, 1000):
        assert torch.equal(exact_topk(s, k), R.topk_indices(s, k))


def test_errors():
    q, keys, ages = make_case(0)
    with pytest.raises(ValueError, match="empty"):
        topk_retrieve(q, keys, 0, ages, K)
    with pytest.raises(ValueError, match="empty"):
        topk_retrieve_chunked(q, keys, 0, ages, K)
    with pytest.raises(ValueError):
        topk_retrieve(q, keys, 601, ages, K)


def test_memory_gather_exact_and_pinned_like():
    pool = torch.randn(600, 24).to(torch.bfloat16)
    idx = torch.tensor([5, 5, 0, 599, 3])
    assert torch.equal(memory_gather(pool, idx), pool[idx])
    assert torch.equal(memory_gather(pool, idx.int()), pool[idx])


# ------------------------------------------------------------------------------------ opt-in bf16 prefilter
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("valid_len", [600, 333, 32, 5])
def test_bf16_prefilter_equals_reference_with_ties(seed, valid_len):
    q, keys, ages = make_case(seed)  # duplicated keys: exact ties at the top-k boundary
    assert torch.equal(topk_retrieve_bf16(q, keys, valid_len, ages, K, oversample=4.0),
                       topk_retrieve(q, keys, valid_len, ages, K))


def test_bf16_prefilter_rescoring_is_the_reference_arithmetic():
    g = torch.Generator().manual_seed(11)
    q, keys = torch.randn(128, 64, generator=g), torch.randn(20000, 64, generator=g)
    ages = torch.randint(0, 100, (20000,), generator=g)
    ref_scores = R.mean_sigmoid_scores(q, keys)
    cand = torch.sort(torch.randperm(20000, generator=g)[:704]).values  # multiple of 64, as the fast path pads
    assert torch.equal(chunked_scores(q, keys.index_select(0, cand)), ref_scores[cand])  # bitwise, any subset
    approx = bf16_scores(q, keys)
    err = (approx - ref_scores).abs().max()
    assert 0 < err < 1e-3  # really approximate, and close
    assert torch.equal(topk_retrieve_bf16(q, keys, 20000, ages, 256), topk_retrieve(q, keys, 20000, ages, 256))
    with pytest.raises(ValueError, match="oversample"):
        topk_retrieve_bf16(q, keys, 20000, ages, 256, oversample=0.5)


def test_bf16_prefilter_compiled_kernel_matches_eager():
    g = torch.Generator().manual_seed(12)
    q, keys = torch.randn(96, 64, generator=g), torch.randn(3000, 64, generator=g)
    ages = torch.randint(0, 100, (3000,), generator=g)
    a, b = bf16_scores(q, keys, 512), bf16_scores(q, keys, 512, compiled=True)  # 5 compiled chunks + eager tail
    assert torch.allclose(a, b, rtol=0, atol=1e-6)  # same bf16 logits; only the summation order differs
    kb = bf16_keys(keys)
    assert torch.equal(bf16_scores(q, keys, 512, keys_bf16=kb), a)
    assert torch.equal(topk_retrieve_bf16(q, keys, 3000, ages, 128, chunk=512, compiled=True, keys_bf16=kb),
                       topk_retrieve(q, keys, 3000, ages, 128))
    with pytest.raises(ValueError, match="bf16 copy"):
        bf16_scores(q, keys, keys_bf16=keys)
