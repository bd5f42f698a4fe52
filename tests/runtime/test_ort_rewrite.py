"""The ONNX Runtime runner's load-time rewrite of a tied lm_head (``runtime.backends.ort_rewrite``): the per-token
graph computes the logits as a prepacked ``Gemm(h, embed, transB=1)``, within fp32 rounding of the exported form."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends.ort_rewrite import tied_lm_head_as_gemm


def _tied_graph(V=300, d=64, also_read_hT=False):
    """The exporter's tied form ``Transpose(MatMul(embed, Transpose(h)))`` beside the embedding ``Gather``."""
    W = np.random.default_rng(0).standard_normal((V, d)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="/embed/Gather", axis=0),
             helper.make_node("Transpose", ["h"], ["hT"], name="/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["W", "hT"], ["lT"], name="/MatMul"),
             helper.make_node("Transpose", ["lT"], ["logits"], name="/Transpose_1", perm=[1, 0])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", V]),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", d])]
    if also_read_hT:
        nodes.append(helper.make_node("Neg", ["hT"], ["neg_hT"], name="/Neg"))
        outs.append(helper.make_tensor_value_info("neg_hT", TensorProto.FLOAT, [d, "T"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", d]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                          outs, [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("also_read_hT", [False, True])
def test_the_tied_lm_head_becomes_one_gemm_with_the_same_logits(also_read_hT):
    m = _tied_graph(also_read_hT=also_read_hT)
    feeds = {"h": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32), "ids": np.array([4, 0, 299])}
    want = _run(m, feeds)
    assert tied_lm_head_as_gemm(m) == 1
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Gemm" in ops and "MatMul" not in ops
    assert ops.count("Transpose") == (1 if also_read_hT else 0)  # the input Transpose stays only for its other reader
    got = _run(m, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want[1:]):
        assert np.array_equal(a, b)
    assert tied_lm_head_as_gemm(m) == 0  # nothing tied is left


@pytest.fixture(scope="module")
def tied_art(tmp_path_factory):
    from mplus_deploy.build import export_artifact
    from mplus_deploy.model import MPlus, preset

    out = tmp_path_factory.mktemp("tied") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(MPlus.from_config(preset("tiny").replace(tie_word_embeddings=True), seed=0), out,
                        validate=False, source={"preset": "tiny"})
    return out


def _decode_run(art, prompt, **kw):
    """(describe()["rewritten"], greedy tokens, the logits of every decode step) of one Engine."""
    kw.setdefault("attention", "graph")  # the fused attention has its own tests (test_ort_gqa.py)
    with Engine(art, backend="onnxruntime", seed=0, **kw) as e:
        seen = []
        inner = e.runner.infer_impl

        def spy(graph, feeds, keep):
            out = inner(graph, feeds, keep)
            if graph == "decode":
                seen.append(out["logits"].clone())
            return out

        e.runner.infer_impl = spy
        tokens = e.generate_ids(prompt, max_new_tokens=6, stop_at_eos=False).tolist()
        return e.runner.describe()["rewritten"], tokens, torch.stack(seen)


def _close(a, b):
    assert a.shape == b.shape and a.shape[0] == 5
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), float((a - b).abs().max())


def test_the_per_token_graph_of_a_tied_artifact_runs_the_gemm_and_generates_the_same(tied_art):
    """Default runner (decode prepacked): decode's tied lm_head a Gemm, prefill not; with fold_lora=True its LoRA
    folded too; logits of every decode step within 1e-5 of the exported form (prepack=(): no packing, no rewrite),
    same tokens."""
    prompt = torch.tensor([5, 9, 2, 7, 11])
    rw0, tok0, lg0 = _decode_run(tied_art, prompt, prepack=())
    assert rw0 == {}
    rw, tok, lg = _decode_run(tied_art, prompt)
    assert rw == {"decode": ["tied_lm_head_gemm"]}, rw
    assert tok == tok0
    _close(lg, lg0)
    rw1, tok1, lg1 = _decode_run(tied_art, prompt, fold_lora=True)
    assert rw1 == {"decode": ["lora_folded:12", "tied_lm_head_gemm"]}, rw1  # tiny: 2 layers x 6 LoRA targets
    assert tok1 == tok0
    _close(lg1, lg0)


def test_folded_lora_decodes_like_the_branches(tiny_artifact):
    """tiny (untied, non-zero LoRA B: the fold changes every weight): folded decode (fold_lora=True) within 1e-5 of
    the exported branches (the default), same tokens."""
    prompt = torch.tensor([3, 1, 4, 1, 5, 9])
    rw, tok, lg = _decode_run(tiny_artifact, prompt, fold_lora=True)
    assert rw == {"decode": ["lora_folded:12"]}, rw
    rw0, tok0, lg0 = _decode_run(tiny_artifact, prompt)
    assert rw0 == {}
    assert tok == tok0
    _close(lg, lg0)
