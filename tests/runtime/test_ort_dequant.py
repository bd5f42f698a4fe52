"""ort_dequant.fold: fp8 weight DQs → one shared fp32 copy, the same numbers as onnxruntime's DequantizeLinear."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mplus_deploy.runtime.backends.ort_dequant import fold
from mplus_deploy.runtime.backends.ort_weights import SharedInitializers


def _fp8(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _graph(tmp_path, zero: np.ndarray, external: bool = True):
    rng = np.random.default_rng(0)
    w = _fp8((rng.standard_normal((16, 8)) * 40).astype(np.float32))
    scale = (rng.random(8).astype(np.float32) + 0.5) / 100
    inits = [helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, w.shape, w.tobytes(), raw=True),
             helper.make_tensor("w_scale", TensorProto.FLOAT, [8], scale),
             helper.make_tensor("w_zero", TensorProto.FLOAT8E4M3FN, [8], zero.tobytes(), raw=True)]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], name="w_DQ", axis=1),
             helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="/mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    p = tmp_path / "g.onnx"
    if external:
        onnx.save(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="g.data",
                  size_threshold=0)
    else:
        onnx.save(m, str(p))
    return p, rng.standard_normal((3, 16)).astype(np.float32)


def _run(model, x, values=None, folder=None, folded=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if folder:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    for k, v in (values or {}).items():
        so.add_initializer(k, v)
    for k, v in (folded or {}).items():
        so.add_initializer(k, v)
    off = ["ConstantFolding"] if folded else []
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"], disabled_optimizers=off).run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [True, False])
def test_fold_matches_onnxruntime_dq(tmp_path, external):
    p, x = _graph(tmp_path, np.zeros(8, np.uint8), external)
    shared = SharedInitializers()
    model, values, folded, n = fold(p, shared)
    assert n == 1
    m = onnx.load_from_string(model)
    assert [nd.op_type for nd in m.graph.node] == ["MatMul"]
    assert {i.name for i in m.graph.initializer} == {"w_dq"}  # the fp8 weight, its scale and zero point are gone
    assert set(folded) == ({"w_dq"} if external else set())
    got = _run(model, x, values, p.parent, folded)
    ref = _run(str(p), x)
    assert np.array_equal(got, ref) and float(np.abs(ref).max()) > 0
    assert shared.derived_bytes == (16 * 8 * 4 if external else 0)  # inline weights stay inline (nothing shared)
    fold(p, shared)
    assert shared.derived_bytes == (16 * 8 * 4 if external else 0)  # a second graph reading the same bytes: no copy


def test_fold_int8_weight_only_and_not_w8a8(tmp_path):
    """An int8 weight DQ beside an fp32 activation is folded (same numbers as ORT's DQ); one whose MatMul also
    reads a DQ'd activation (W8A8, fused by ORT into integer kernels) is left alone."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    scale = (rng.random(8).astype(np.float32) + 0.5) / 100
    inits = [helper.make_tensor("w", TensorProto.INT8, w.shape, w.tobytes(), raw=True),
             helper.make_tensor("w_scale", TensorProto.FLOAT, [8], scale),
             helper.make_tensor("w_zero", TensorProto.INT8, [8], np.zeros(8, np.int8).tobytes(), raw=True),
             helper.make_tensor("a_scale", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("a_zero", TensorProto.INT8, [], np.zeros(1, np.int8).tobytes(), raw=True)]
    dq = helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], name="w_DQ", axis=1)
    for w8a8 in (False, True):
        act = ["x"]
        nodes = [dq]
        if w8a8:
            nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"], name="x_Q"),
                     helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zero"], ["x_dq"], name="x_DQ"), dq]
            act = ["x_dq"]
        nodes.append(helper.make_node("MatMul", act + ["w_dq"], ["y"], name="/mm"))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)
        p = tmp_path / f"int8_{w8a8}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(p), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=f"int8_{w8a8}.data", size_threshold=0)
        model, values, folded, n = fold(p, SharedInitializers())
        assert n == (0 if w8a8 else 1)
        x = rng.standard_normal((3, 16)).astype(np.float32)
        got, ref = _run(model, x, values, p.parent, folded), _run(str(p), x)
        assert np.array_equal(got, ref) and float(np.abs(ref).max()) > 0


def test_fold_leaves_a_nonzero_zero_point_to_onnxruntime(tmp_path):
    """(onnxruntime itself rejects it at run time; fold never computes what it does not reproduce exactly.)"""
    zero = _fp8(np.full(8, 2.0, np.float32))
    p, _ = _graph(tmp_path, zero)
    shared = SharedInitializers()
    model, values, folded, n = fold(p, shared)
    assert n == 0 and folded == {} and shared.derived_bytes == 0
    m = onnx.load_from_string(model)
    assert [nd.op_type for nd in m.graph.node] == ["DequantizeLinear", "MatMul"]
    assert {i.name for i in m.graph.initializer} == {"w", "w_scale", "w_zero"} and "w" in values


def test_constant_reads_finds_the_nodes_constant_folding_would_evaluate():
    """A folded weight read by a node whose other inputs are constants (a Constant node, an initializer, a Shape)
    is flagged: onnxruntime's constant folding would read the placeholder; one read with a graph input is not."""
    from mplus_deploy.runtime.backends.ort_dequant import constant_reads

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    nodes = [helper.make_node("Constant", [], ["bos"], value=helper.make_tensor("v", TensorProto.FLOAT, [1, 4], [1.0] * 4)),
             helper.make_node("Relu", ["bos"], ["bos_n"], name="/bos/norm"),
             helper.make_node("MatMul", ["bos_n", "w"], ["bos_k"], name="/bos/k_proj"),
             helper.make_node("MatMul", ["x", "w"], ["k"], name="/k_proj")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("bos_k", "k")], [w])
    m = helper.make_model(g)
    assert [n.name for n in constant_reads(m, {"w"})] == ["/bos/k_proj"]
    assert constant_reads(m, {"x"}) == []
