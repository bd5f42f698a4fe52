"""``kvcache.DecodeCache``: prefill's stacked cache → the decode graph's per-layer prefix + tail feeds."""
import pytest
import torch

from mplus_deploy.runtime.kvcache import DecodeCache, decode_output_names


def test_split_is_exact_contiguous_and_advances():
    g = torch.Generator().manual_seed(0)
    L, Hkv, P, T, Dh = 3, 2, 5, 4, 8
    k, v = torch.randn(L, Hkv, P + T, Dh, generator=g), torch.randn(L, Hkv, P + T, Dh, generator=g)
    placed = []
    c = DecodeCache(k, v, P, place=lambda d: placed.append(sorted(d)) or d)
    assert placed == [sorted(f"prefix_{x}.{l}" for l in range(L) for x in "kv"),
                      sorted(f"past_{x}.{l}" for l in range(L) for x in "kv")]
    f = c.feeds()
    assert len(f) == 4 * L
    for l in range(L):
        for x, t in (("k", k), ("v", v)):
            assert torch.equal(f[f"prefix_{x}.{l}"], t[l, :, :P]) and f[f"prefix_{x}.{l}"].is_contiguous()
            assert torch.equal(f[f"past_{x}.{l}"], t[l, :, P:]) and f[f"past_{x}.{l}"].is_contiguous()
    assert c.keep == tuple(decode_output_names(L)) == ("present_k.0", "present_v.0", "present_k.1", "present_v.1",
                                                        "present_k.2", "present_v.2")
    step = {n: torch.full((Hkv, T + 1, Dh), float(i)) for i, n in enumerate(c.keep)}
    step["logits"] = torch.zeros(1, 7)
    prefix = c.prefix
    c.advance(step)
    assert c.prefix is prefix and c.feeds()["past_v.1"] is step["present_v.1"] and c.feeds()["past_k.2"] is step["present_k.2"]


def test_rejects_bad_caches():
    k = torch.zeros(2, 2, 6, 4)
    with pytest.raises(ValueError, match="prefix_len 6"):
        DecodeCache(k, k, 6)  # no tail: prefill always has >= 1 prompt row
    with pytest.raises(ValueError, match="stacked"):
        DecodeCache(k[0], k[0], 2)
