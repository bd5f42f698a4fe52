"""An untied lm_head larger than ``common.LM_HEAD_CHUNK_BYTES`` is exported as row blocks
(``common.ChunkedLinear``, weights ``rows:lm_head.weight:a:b``): several lm_head MatMuls in prefill and
decode, each block stored once (transposed) with the checkpoint's rows, validated, and the logits equal the
one-block artifact's. The tiny preset's lm_head (256 x 64 fp32 = 64 KiB) is made "large" by lowering the
limit to 100 rows."""
from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mplus_deploy.export import common, families
import mplus_deploy.artifact as M
from tests.ort_helpers import ort_session, to_feed
from mplus_deploy.export.weights import WeightSource
from mplus_deploy.artifact.graph_io import resolve

ROWS = 100  # 256 rows -> blocks [0, 100), [100, 200), [200, 256)
BOUNDS = [(0, 100), (100, 200), (200, 256)]
LM_GRAPHS = ("prefill", "decode")


@pytest.fixture(scope="module")
def chunked_art(tmp_path_factory, tiny_model):
    from mplus_deploy.build import export_artifact

    cfg = tiny_model.config
    assert not cfg.tie_word_embeddings and tiny_model.lm_head.weight is not tiny_model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("art") / "tiny-chunked"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(common, "LM_HEAD_CHUNK_BYTES", ROWS * cfg.hidden_size * 4)
        assert common.ChunkedLinear.wanted(tiny_model.lm_head.weight)
        report = export_artifact(tiny_model, out, source={"preset": "tiny"})
    return out, report


def _lm_matmuls(path) -> list[onnx.NodeProto]:
    m = onnx.load(str(path), load_external_data=False)
    return [n for n in m.graph.node if re.fullmatch(r"/lm_head/MatMul(_\d+)?", n.name)]


def test_prefill_and_decode_have_one_matmul_per_block(chunked_art, tiny_art, tiny_model):
    out, _ = chunked_art
    W = tiny_model.lm_head.weight.detach()
    for g in LM_GRAPHS:
        mms = _lm_matmuls(out / "graphs" / f"{g}.onnx")
        assert len(mms) == len(BOUNDS), (g, [n.name for n in mms])
        m = onnx.load(str(out / "graphs" / f"{g}.onnx"))  # with its external data (tiny)
        inits = {t.name: t for t in m.graph.initializer}
        assert not any(n.op_type == "Transpose" and "lm_head" in n.name for n in m.graph.node), g
        blocks = [numpy_helper.to_array(inits[n.input[1]]) for n in mms]
        assert [b.shape for b in blocks] == [(W.shape[1], b - a) for a, b in BOUNDS]
        for (a, b), blk in zip(BOUNDS, blocks):  # the checkpoint's rows a:b, stored transposed
            np.testing.assert_array_equal(blk, W[a:b].t().numpy())
        assert len(_lm_matmuls(tiny_art[0] / "graphs" / f"{g}.onnx")) == 1, g  # the unchunked artifact: one
    # the blocks are shared by both graphs: no more weight bytes than the one-block artifact
    assert M.load_manifest(out)["weights"]["bytes"] == M.load_manifest(tiny_art[0])["weights"]["bytes"]


def test_validation_passes(chunked_art):
    out, report = chunked_art
    man = M.load_manifest(out)
    for g in report.graphs:
        v = g.validation
        assert v is not None and v.cases >= 1 and v.ok, g.name
        for o in v.outputs.values():
            assert o.mismatches == 0 and o.max_abs <= 1e-5 * max(1.0, o.scale), (g.name, o.name, o.max_abs)
        assert man["graphs"][g.name]["validation"]["tolerance"] == 1e-4 * (4.0 if g.name == "decode_batch" else 1.0)


@pytest.mark.parametrize("graph", LM_GRAPHS)
def test_logits_equal_the_unchunked_artifact(chunked_art, tiny_art, tiny_model, graph):
    cfg = tiny_model.config
    limits = common.Limits.from_config(cfg)
    fam = next(f for f in families.families(cfg) if f.name == graph)
    spec = fam.spec(cfg, limits)
    a = ort_session(chunked_art[0] / "graphs" / f"{graph}.onnx")
    b = ort_session(tiny_art[0] / "graphs" / f"{graph}.onnx")
    names = [o.name for o in spec.outputs]
    n = 0
    for feeds, ref in fam.cases(tiny_model, limits, 7):
        x = {i.name: to_feed(resolve(feeds, i.name), "fp32") for i in spec.inputs}
        got, want = a.run(names, x), b.run(names, x)
        logits, ref_logits = got[0], ref()["logits"].numpy()
        assert logits.shape[-1] == cfg.vocab_size and np.abs(logits).max() > 0.1
        scale = max(1.0, float(np.abs(want[0]).max()))
        assert float(np.abs(logits - want[0]).max()) <= 1e-5 * scale
        assert float(np.abs(logits - ref_logits).max()) <= 1e-5 * scale
        for name, g, w in zip(names[1:], got[1:], want[1:]):  # K/V and retrieved indices: untouched
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())), err_msg=name)
        n += 1
    assert n >= 2


def test_chunked_linear_forward_equals_linear(monkeypatch):
    """``ChunkedLinear`` itself (what the graph was traced from): same products, concatenated."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 32, generator=g)
    x = torch.randn(3, 32, generator=g)
    monkeypatch.setattr(common, "LM_HEAD_CHUNK_BYTES", 96 * 32 * 4)
    lin = common.ChunkedLinear(w)
    assert lin.bounds == [(a, min(1000, a + 96)) for a in range(0, 1000, 96)]
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w), rtol=1e-6, atol=1e-6)
    derived = lin.derived_weights("lm_head.")
    assert set(derived) == {f"lm_head.chunks.{i}" for i in range(len(lin.bounds))}
    key, make = derived["lm_head.chunks.10"]
    assert key == "rows:lm_head.weight:960:1000"

    class Src(WeightSource):
        def get(self, name, dtype=None):
            t = {"lm_head.weight": w}[name]
            return t if dtype is None else t.to(dtype)

    assert torch.equal(make(Src(), None), w[960:])
    assert torch.equal(make(Src(), torch.bfloat16), w[960:].to(torch.bfloat16))


def test_checkpoint_source_reads_the_same_blocks(chunked_art, tiny_model, tmp_path):
    """From a checkpoint directory the blocks are read by row range (``CheckpointWeights.get_rows``):
    byte-identical weights.data to the in-memory model's export."""
    from mplus_deploy.build import export_artifact
    from mplus_deploy.export.weights import CheckpointWeights
    from mplus_deploy.model import checkpoint

    ck = checkpoint.save(tiny_model, tmp_path / "ckpt")
    src = CheckpointWeights(ck)
    reads = []
    orig = src.get_rows
    src.get_rows = lambda name, a, b, dtype=None: reads.append((name, a, b)) or orig(name, a, b, dtype)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(common, "LM_HEAD_CHUNK_BYTES", ROWS * tiny_model.config.hidden_size * 4)
        export_artifact(src, tmp_path / "art", validate=False)
    assert sorted(set(reads)) == [("lm_head.weight", a, b) for a, b in BOUNDS]
    got = (tmp_path / "art" / "graphs" / "weights.data").read_bytes()
    assert got == (chunked_art[0] / "graphs" / "weights.data").read_bytes()
