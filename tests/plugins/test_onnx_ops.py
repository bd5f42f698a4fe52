import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from mplus_deploy.plugins import onnx_ops as O
from mplus_deploy.plugins import topk_retrieve

from .conftest import make_case

K, D, H = 32, 16, 8


def feeds(seed, valid_len):
    q, keys, ages = make_case(seed)
    pool = torch.randn(keys.shape[0], H, generator=torch.Generator().manual_seed(seed))
    f = {"q": q.numpy(), "keys": keys.numpy(), "valid_len": np.array([valid_len], np.int64),
         "ages": ages.numpy(), "pool": pool.numpy()}
    ref = topk_retrieve(q, keys, valid_len, ages, K).numpy()
    return f, ref, pool.numpy()[ref]


@pytest.fixture(scope="module")
def models():
    std = O.build_retrieval_model(K, D, with_gather=True, H=H)
    custom = O.build_retrieval_model(K, D, with_gather=True, H=H, custom=True)
    onnx.checker.check_model(std)
    return std, custom


def test_schemas_registered():
    assert onnx.defs.has("TopKRetrieve", "mplus") and onnx.defs.has("MemoryGather", "mplus")
    s = onnx.defs.get_schema("TopKRetrieve", 1, "mplus")
    assert {"k", "plugin_namespace", "plugin_version"} <= set(s.attributes)


def test_custom_node_attrs(models):
    n = next(n for n in models[1].graph.node if n.op_type == "TopKRetrieve")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    assert n.domain == "mplus" and attrs == {"k": K, "score_chunks": 1, "plugin_namespace": b"mplus",
                                             "plugin_version": b"1"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("valid_len", [600, 451, 32, 31, 7, 1])
def test_all_backends_equal_reference(models, seed, valid_len):
    std, custom = models
    f, ref, rows = feeds(seed, valid_len)
    outs = {
        "ort_std": O.ort_session(std).run(None, f),
        "refeval_custom": ReferenceEvaluator(custom, new_ops=O.reference_ops()).run(None, f),
        "ort_ext_custom": O.ort_session(custom, custom=True).run(None, f),
    }
    for name, (idx, got_rows) in outs.items():
        assert np.array_equal(idx, ref), name
        assert np.array_equal(got_rows, rows), name


def test_fuse_and_lower_round_trip(models):
    std, _ = models
    fused = O.fuse_retrieval(std)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("TopKRetrieve") == 1 and "TopK" not in ops and "Sigmoid" not in ops
    lowered = O.lower_retrieval(fused)
    assert "TopKRetrieve" not in [n.op_type for n in lowered.graph.node]
    onnx.checker.check_model(lowered)
    for seed, vl in [(0, 600), (1, 300), (2, 9)]:
        f, ref, _ = feeds(seed, vl)
        a = O.ort_session(std).run(None, f)
        b = O.ort_session(lowered).run(None, f)
        c = O.ort_session(fused, custom=True).run(None, f)
        for x, y, z in zip(a, b, c):
            assert np.array_equal(x, y) and np.array_equal(x, z)
    # lowering the custom MemoryGather too
    low2 = O.lower_retrieval(O.build_retrieval_model(K, D, with_gather=True, H=H, custom=True))
    assert {n.domain for n in low2.graph.node} <= {""}


def test_fuse_rejects_non_retrieval():
    g = O.build_retrieval_model(K, D)
    for n in g.graph.node:
        if n.op_type == "Sigmoid":
            n.op_type = "Relu"
    with pytest.raises(ValueError, match="lacks a Sigmoid"):
        O.fuse_retrieval(g)


def test_random_gaussian_ort_vs_reference_except_boundary_ties():
    g = torch.Generator().manual_seed(11)
    q, keys = torch.randn(32, D, generator=g), torch.randn(3000, D, generator=g)
    ages = torch.randint(0, 30, (3000,), generator=g)
    k = 256
    m = O.build_retrieval_model(k, D)
    out = O.ort_session(m).run(None, {"q": q.numpy(), "keys": keys.numpy(), "ages": ages.numpy(),
                                     "valid_len": np.array([3000], np.int64)})[0]
    ref = topk_retrieve(q, keys, 3000, ages, k).numpy()
    # fp32 summation order may differ (MatMul/ReduceMean): sets must match except boundary near-ties
    from mplus_deploy.model.retrieval import mean_sigmoid_scores
    s = mean_sigmoid_scores(q, keys)
    kth = torch.sort(s, descending=True).values[k - 1]
    diff = set(out.tolist()) ^ set(ref.tolist())
    assert all(abs(float(s[i] - kth)) < 1e-6 for i in diff), diff
    if not diff:
        assert np.array_equal(out, ref)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("valid_len,merged_len", [(600, 600), (600, 20), (600, 450), (40, 33), (40, 1)])
def test_merged_len_and_chunks_lowering_equal_reference(chunks, valid_len, merged_len):
    """Rows past merged_len are pending: scored by the top-k branch, ignored by the small-LTM branch (cyclic over
    merged_len, ``retrieval.select``); the chunked scores pick the same rows. Standard form, custom form lowered,
    fused back, and the onnx.reference oracle all equal the reference."""
    std = O.build_retrieval_model(K, D, merged=True, chunks=chunks)
    custom = O.build_retrieval_model(K, D, merged=True, chunks=chunks, custom=True)
    assert sum(n.op_type == "Sigmoid" for n in std.graph.node) == chunks
    lowered = O.lower_retrieval(custom)
    fused = O.fuse_retrieval(std)
    n = next(n for n in fused.graph.node if n.op_type == "TopKRetrieve")
    assert len(n.input) == 5 and onnx.helper.get_attribute_value(n.attribute[1]) == chunks
    f, _, _ = feeds(3, valid_len)
    f.pop("pool")
    f["merged_len"] = np.array([merged_len], np.int64)
    q, keys, ages = (torch.from_numpy(f[k]) for k in ("q", "keys", "ages"))
    ref = topk_retrieve(q, keys, valid_len, ages, K, merged_len=merged_len).numpy()
    if merged_len < valid_len and merged_len < K:  # the branch differs from merged_len = valid_len's
        assert not np.array_equal(ref, topk_retrieve(q, keys, valid_len, ages, K).numpy())
    for name, m in (("std", std), ("lowered", lowered), ("fused->lowered", O.lower_retrieval(fused))):
        assert np.array_equal(O.ort_session(m).run(None, f)[0], ref), name
    assert np.array_equal(ReferenceEvaluator(custom, new_ops=O.reference_ops()).run(None, f)[0], ref)


def test_topk_retrieve_refuses_empty_merged_ltm():
    q, keys, ages = make_case(0)
    with pytest.raises(ValueError, match="merged_len=0"):
        topk_retrieve(q, keys, 100, ages, K, merged_len=0)
