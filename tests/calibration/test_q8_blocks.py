"""8-bit symmetric blocks (q8_blocks.py): llama.cpp's Q8_0 grid as MatMulNBits(bits=8), the int4 lm_head."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mplus_deploy.calibration import asym_int4 as A
from mplus_deploy.calibration import q8_blocks as Q8

from .test_asym_int4 import _tied_graph


def _q8_0_weight(rng, K=96, N=40, block=32):
    """A weight exactly on a Q8_0 grid (per block: fp16 d, q in -127..127 with |q| = 127 used)."""
    d = rng.uniform(0.001, 0.02, (N, K // block)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (N, K // block, block))
    q[..., 0] = rng.choice([-127, 127], (N, K // block))
    return (d[..., None] * q).reshape(N, K).T.astype(np.float32)


def test_blocks_roundtrip_q8_0_is_lossless_and_generic_error_is_half_a_step(monkeypatch):
    rng = np.random.default_rng(0)
    w = _q8_0_weight(rng)
    q, d = Q8.quantize_blocks(w, 32)
    assert np.abs(q).max() == 127 and q.dtype == np.int8
    assert np.array_equal(Q8.dequantize(q, d), w) and Q8.on_grid(w)
    g = rng.standard_normal((64, 40)).astype(np.float32)
    monkeypatch.setattr(Q8, "CHUNK", 7)  # the column slices agree with one pass
    q7, d7 = Q8.quantize_blocks(g, 32)
    monkeypatch.setattr(Q8, "CHUNK", 8192)
    q, d = Q8.quantize_blocks(g, 32)
    assert np.array_equal(q7, q) and np.array_equal(d7, d)
    err = np.abs(Q8.dequantize(q, d) - g).T.reshape(40, 2, 32).max(-1)
    assert (err <= 0.5 * d + 1e-6).all() and not Q8.on_grid(g)
    with pytest.raises(ValueError, match="does not divide"):
        Q8.quantize_blocks(g[:40], 32)


def _run(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_matmul_becomes_one_8bit_matmulnbits_with_the_grid_weights():
    """Accuracy level 0 (fp32 compute): the output is x @ dequant(q) to fp32 rounding; level 4 (the default,
    int8 activations as llama.cpp rounds them against Q8_0) stays within the activation's rounding."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for level, rtol in ((0, 1e-5), (4, 2e-2)):
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="/lm_head/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 48])],
                              [numpy_helper.from_array(w, "W")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        assert Q8.apply(m, ["/lm_head/MatMul"], 32, level) == 1
        onnx.checker.check_model(m)
        (n,) = m.graph.node
        assert n.op_type == "MatMulNBits" and {a.name: a.i for a in n.attribute}["bits"] == 8
        assert [i.name for i in m.graph.initializer] == ["/lm_head/int8.B", "/lm_head/int8.scales"]  # W is gone
        (y,) = _run(m, {"x": x})
        want = x @ Q8.dequantize(*Q8.quantize_blocks(w, 32))
        np.testing.assert_allclose(y, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_tied_lm_head_in_8_bits_reads_the_q8_grid_and_keeps_the_fp32_embedding():
    m, W = _tied_graph()
    W8 = _q8_0_weight(np.random.default_rng(2), K=64, N=100).T.copy()  # [V, d] on the Q8_0 grid along d
    next(i for i in m.graph.initializer if i.name == "W").CopyFrom(numpy_helper.from_array(W8, "W"))
    assert A.apply_tied_lm_head(m, 32, 0, bits=8) == 1
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 1 and "MatMul" not in ops and "Transpose" not in ops  # no offset term
    h = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    logits, emb = _run(m, {"h": h, "ids": np.array([1, 5])})
    np.testing.assert_allclose(logits, h @ W8.T, rtol=1e-5, atol=1e-5 * np.abs(logits).max())  # lossless grid
    assert np.array_equal(emb, W8[[1, 5]])
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        A.apply_tied_lm_head(_tied_graph()[0], 32, 0, bits=6)
