"""INT4 rtn_asym (asym_int4.py): Q4_1-grid blocks as MatMulNBits + block offset."""
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper, TensorProto

from mplus_deploy.calibration import asym_int4 as A
from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.quantize import ort_session, quantized_matmuls

from .conftest import FAST


def _q4_1_weight(rng, K=96, N=40, block=32):
    """A weight exactly on a Q4_1 grid (per block: fp16 d and m, q in 0..15 with 0 and 15 both used)."""
    d = rng.uniform(0.001, 0.02, (N, K // block)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.2, 0.0, (N, K // block)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (N, K // block, block))
    q[..., 0], q[..., 1] = 0, 15
    return (m[..., None] + d[..., None] * q).reshape(N, K).T.astype(np.float32)


def test_blocks_roundtrip_and_q4_1_is_lossless():
    rng = np.random.default_rng(0)
    w = _q4_1_weight(rng)
    q, d, mn = A.quantize_blocks(w, 32)
    assert q.min() == 0 and q.max() == 15
    np.testing.assert_allclose(A.dequantize(q, d, mn), w, rtol=0, atol=1e-7 * np.abs(w).max())
    g = rng.standard_normal((64, 40)).astype(np.float32)  # a generic weight: error <= half a step per block
    q, d, mn = A.quantize_blocks(g, 32)
    err = np.abs(A.dequantize(q, d, mn) - g).T.reshape(40, 2, 32).max(-1)
    assert (err <= 0.5 * d + 1e-6).all()
    packed = A.pack_nibbles(q)
    assert packed.shape == (40, 2, 16) and (packed & 15).tolist() == q[..., 0::2].tolist()
    with pytest.raises(ValueError, match="does not divide"):
        A.quantize_blocks(g[:40], 32)


@pytest.mark.parametrize("level", [1, 4])
def test_rewrite_matches_dequantized_weight_in_ort(level):
    rng = np.random.default_rng(1)
    w1, w2 = _q4_1_weight(rng, 64, 48), rng.standard_normal((64, 24)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="/layers.0/q_proj/base_layer/MatMul"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="/layers.0/k_proj/base_layer/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 64])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", n]) for y, n in (("y1", 48), ("y2", 24))],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert A.apply(m, [n.name for n in nodes], 32, level) == 2
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("ReduceSum") == 1 and ops.count("Split") == 1  # q/k packed
    assert {i.name for i in m.graph.initializer}.isdisjoint({"w1", "w2"})
    assert sorted(quantized_matmuls(m)) == sorted(n.name for n in nodes)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y1, y2 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    tol = 1e-5 if level == 1 else 2e-2  # level 4 = int8 activations inside MatMulNBits
    np.testing.assert_allclose(y1, x @ w1, rtol=0, atol=tol * np.abs(x @ w1).max())  # lossless on a Q4_1 grid
    q, d, mn = A.quantize_blocks(w2, 32)
    np.testing.assert_allclose(y2, x @ A.dequantize(q, d, mn), rtol=0, atol=tol * np.abs(y2).max())


def _qkv_graph(rng, K=64, Ns=(64, 32, 32)):
    """Three MatMuls reading one input (a layer's q/k/v) and one reading another (o), weights random."""
    names = ["q_proj", "k_proj", "v_proj"]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"/layers.0/{nm}/base_layer/MatMul")
             for i, nm in enumerate(names)]
    nodes.append(helper.make_node("MatMul", ["y0", "wo"], ["o"], name="/layers.0/o_proj/MatMul"))
    inits = [numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32), f"w{i}") for i, n in enumerate(Ns)]
    inits.append(numpy_helper.from_array(rng.standard_normal((Ns[0], K)).astype(np.float32), "wo"))
    outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", n]) for y, n in zip(("y0", "y1", "y2", "o"), Ns + (K,))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), [n.name for n in nodes]


@pytest.mark.parametrize("level", [1, 4])
def test_packed_columns_equal_the_unpacked_rewrite(level):
    """q/k/v reading one input become one MatMulNBits + one offset Gemm + Split; every output column is the
    same dot product as in the one-node-per-MatMul rewrite: bit for bit in ONNX Runtime, at both accuracy levels."""
    rng = np.random.default_rng(5)
    base, names = _qkv_graph(rng)
    packed, single = onnx.ModelProto(), onnx.ModelProto()
    packed.CopyFrom(base)
    single.CopyFrom(base)
    assert A.apply(packed, names, 32, level) == A.apply(single, names, 32, level, pack=False) == 4
    onnx.checker.check_model(packed)
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Gemm") == 2 and ops.count("Split") == 1
    assert [n.op_type for n in single.graph.node].count("MatMulNBits") == 4
    nb = next(n for n in packed.graph.node if n.op_type == "MatMulNBits" and "{" in n.name)
    assert nb.name == "/layers.0/{q_proj,k_proj,v_proj}/base_layer/MatMulNBits"
    assert sorted(quantized_matmuls(packed)) == sorted(quantized_matmuls(single)) == sorted(names)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})  # noqa: E731
    for a, b in zip(run(packed), run(single)):
        assert np.array_equal(a, b)


def test_packed_names_round_trip():
    bases = ["/layers.0/mlp/gate_proj/base_layer", "/layers.0/mlp/up_proj/base_layer"]
    assert A.join_names(bases) == "/layers.0/mlp/{gate_proj,up_proj}/base_layer"
    assert A.members(A.join_names(bases)) == bases
    odd = ["/a/x", "/b/y/z"]  # no single differing segment: the whole bases
    assert A.join_names(odd) == "{/a/x,/b/y/z}" and A.members(A.join_names(odd)) == odd
    assert A.members("/layers.3/o_proj") == ["/layers.3/o_proj"]


def test_artifact_rtn_asym(tmp_path):
    from mplus_deploy.build import export_artifact
    from mplus_deploy.model import MPlus, preset

    model = MPlus.from_config(preset("tiny"), seed=0)
    out = tmp_path / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(model, out, validate=False, source={"preset": "tiny"})
    with pytest.raises(ValueError, match="does not combine"):
        quantize_artifact(out, "int4", "builtin", model=model, progress=False, print_table=False, gptq=True,
                          calib_method="rtn_asym", **FAST)
    rep = quantize_artifact(out, "int4", None, progress=False, print_table=False, calib_method="rtn_asym",
                            int4_accuracy_level=1, **dict(FAST, graphs=("decode", "prefill")))
    e = rep["quantization"]["decode"]
    assert e["method"] == "rtn_asym" and e["quantized_nodes"] == e["selected"] == 7 * model.config.num_hidden_layers
    m = onnx.load(str(out / e["file"]))
    assert len(A.nbits_matmuls(m)) == e["quantized_nodes"]
    assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) == 4 * model.config.num_hidden_layers  # qkv, o, gate/up, down
    ort_session(out / e["file"], "basic")
    assert rep["end_to_end"]["top1_agreement"] > 0.5  # random tiny weights: plain asymmetric RTN, not lossless
    man = json.loads((out / "manifest.json").read_text())
    assert man["quantized"]["int4"]["calibration"]["method"] == "rtn_asym"


def test_on_grid_detects_q4_1_weights():
    rng = np.random.default_rng(3)
    assert A.on_grid(_q4_1_weight(rng))
    assert not A.on_grid(rng.standard_normal((64, 8)).astype(np.float32))
    assert not A.on_grid(_q4_1_weight(rng)[:40])  # block does not divide K


def _tied_graph(V=100, d=64, seed=0):
    W = np.random.default_rng(seed).standard_normal((V, d)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"], name="/embed/Gather", axis=0),
             helper.make_node("Transpose", ["h"], ["hT"], name="/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["W", "hT"], ["lT"], name="/MatMul"),
             helper.make_node("Transpose", ["lT"], ["logits"], name="/Transpose_1", perm=[1, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", d]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", V]),
                           helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", d])],
                          [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, W


def test_tied_lm_head_becomes_matmulnbits_and_the_embedding_stays_fp32():
    """The exported tied lm_head ``Transpose(MatMul(embed, Transpose(h)))`` (no transposed copy of the table) is
    rewritten by --quantize-lm-head to MatMulNBits over an int4 copy of embed^T: logits equal h @ dequant(q) to
    fp32 rounding (accuracy level 0), the Gather still reads the fp32 table."""
    m, W = _tied_graph()
    assert A.tied_lm_head(m)[1].name == "/MatMul"
    assert A.apply_tied_lm_head(m, 32, 0) == 1
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert "MatMulNBits" in ops and "Transpose" not in ops and ops.count("Gemm") == 1  # the block-offset term
    h = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, emb = s.run(None, {"h": h, "ids": np.array([1, 5])})
    q, d, mn = A.quantize_blocks(W.T.copy(), 32)
    np.testing.assert_allclose(logits, h @ A.dequantize(q, d, mn), rtol=1e-5, atol=1e-4)
    assert np.array_equal(emb, W[[1, 5]])
    assert A.apply_tied_lm_head(m, 32, 0) == 0  # nothing tied is left
