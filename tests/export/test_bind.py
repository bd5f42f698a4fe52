"""``bind.bind_weights`` + ``dedupe.WeightStore`` on hand-built graphs: graph inputs become external
initializers named by their checkpoint key, a ``Transpose(perm=[1,0])`` of a weight is folded into a
transposed stored tensor, bf16 storage gets one ``Cast`` per weight (on the output of a Gather reading it
as data), and onnxruntime computes what numpy computes on the (rounded) weights."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mplus_deploy.export import dedupe
from mplus_deploy.export.bind import bind_weights
from mplus_deploy.export.dedupe import WeightStore

OPSET = 21
F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def g_transpose_matmul():
    """Y = X @ W^T (how TorchScript writes nn.Linear without constant folding)."""
    return _model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="/lin/Transpose"),
                   helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="/lin/MatMul")],
                  [_vi("X", F32, [5, 8]), _vi("W", F32, [6, 8])], [_vi("Y", F32, [5, 6])])


def g_gather():
    """E = W[ids] * 2 (an embedding table read as data)."""
    two = helper.make_tensor("two", F32, [], [2.0])
    m = _model([helper.make_node("Gather", ["W", "ids"], ["E"], axis=0, name="/embed/Gather"),
                helper.make_node("Mul", ["E", "two"], ["Y"], name="/embed/Mul")],
               [_vi("ids", TensorProto.INT64, [4]), _vi("W", F32, [10, 8])], [_vi("Y", F32, [4, 8])])
    m.graph.initializer.append(two)
    return m


def g_transpose_and_mul():
    """Y = X @ W^T and Z = X2 * W: W is read both transposed and plain."""
    return _model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="/a/Transpose"),
                   helper.make_node("MatMul", ["X", "Wt"], ["Y"], name="/a/MatMul"),
                   helper.make_node("Mul", ["X2", "W"], ["Z"], name="/b/Mul")],
                  [_vi("X", F32, [5, 8]), _vi("X2", F32, [6, 8]), _vi("W", F32, [6, 8])],
                  [_vi("Y", F32, [5, 6]), _vi("Z", F32, [6, 8])])


def _w(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.7 + 0.3


def _bind(tmp_path, mp, sources, storage=None):
    with WeightStore(tmp_path) as store:
        stats = bind_weights(mp, sources, store, storage)
    path = tmp_path / "g.onnx"
    onnx.save_model(mp, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return stats, store, path


def _stored(tmp_path, init: TensorProto) -> np.ndarray:
    ext = {e.key: e.value for e in init.external_data}
    assert init.data_location == TensorProto.EXTERNAL and ext["location"] == dedupe.WEIGHTS_FILE
    raw = (tmp_path / ext["location"]).read_bytes()[int(ext["offset"]): int(ext["offset"]) + int(ext["length"])]
    np_dt = {F32: np.float32, TensorProto.BFLOAT16: np.uint16}[init.data_type]
    a = np.frombuffer(raw, dtype=np_dt).reshape(tuple(init.dims))
    if init.data_type == TensorProto.BFLOAT16:  # bf16 bits are the high half of an fp32
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _run(path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["ConstantFolding"])
    return sess.run(None, feeds)


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _bf16(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).float().numpy()


def _inits(mp):
    return {t.name: t for t in mp.graph.initializer}


# ------------------------------------------------------------------------------ fp32 storage
def test_transpose_is_folded_into_the_stored_tensor(tmp_path):
    W = _w((6, 8), 0)
    mp = g_transpose_matmul()
    stats, store, path = _bind(tmp_path, mp, {"W": ("model.layers.0.mlp.w.weight", lambda: W)})
    assert stats == {"bound": 1, "cast": 0}
    assert [n.op_type for n in mp.graph.node] == ["MatMul"]
    assert [i.name for i in mp.graph.input] == ["X"]
    inits = _inits(mp)
    assert set(inits) == {"model.layers.0.mlp.w.weight.T"}
    t = inits["model.layers.0.mlp.w.weight.T"]
    assert list(t.dims) == [8, 6] and t.data_type == F32
    np.testing.assert_array_equal(_stored(tmp_path, t), W.t().numpy())
    assert mp.graph.node[0].input[1] == "model.layers.0.mlp.w.weight.T"
    X = _x((5, 8), 1)
    (y,) = _run(path, {"X": X})
    np.testing.assert_allclose(y, X @ W.numpy().T, rtol=1e-5, atol=1e-5)
    assert (tmp_path / dedupe.WEIGHTS_FILE).stat().st_size == W.numel() * 4


def test_gather_weight_is_external_and_untransposed(tmp_path):
    W = _w((10, 8), 2)
    mp = g_gather()
    stats, _, path = _bind(tmp_path, mp, {"W": ("model.embed_tokens.weight", lambda: W)})
    assert stats == {"bound": 1, "cast": 0}
    t = _inits(mp)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(_stored(tmp_path, t), W.numpy())
    assert mp.graph.node[0].input[0] == "model.embed_tokens.weight"
    ids = np.array([3, 0, 9, 3], dtype=np.int64)
    (y,) = _run(path, {"ids": ids})
    np.testing.assert_array_equal(y, W.numpy()[ids] * 2)


def test_plain_and_transposed_reads_store_both(tmp_path):
    W = _w((6, 8), 3)
    mp = g_transpose_and_mul()
    stats, store, path = _bind(tmp_path, mp, {"W": ("lin.weight", lambda: W)})
    assert stats == {"bound": 2, "cast": 0}
    assert "Transpose" not in [n.op_type for n in mp.graph.node]
    inits = _inits(mp)
    assert set(inits) == {"lin.weight", "lin.weight.T"}
    np.testing.assert_array_equal(_stored(tmp_path, inits["lin.weight"]), W.numpy())
    np.testing.assert_array_equal(_stored(tmp_path, inits["lin.weight.T"]), W.t().numpy())
    assert store.stats()["unique_tensors"] == 2
    X, X2 = _x((5, 8), 4), _x((6, 8), 5)
    y, z = _run(path, {"X": X, "X2": X2})
    np.testing.assert_allclose(y, X @ W.numpy().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, X2 * W.numpy())


# ------------------------------------------------------------------------------ bf16 storage
def _cast_nodes(mp):
    return [n for n in mp.graph.node if n.op_type == "Cast"]


def _producer_index(mp, name):
    return next(i for i, n in enumerate(mp.graph.node) if name in n.output)


def test_bf16_transpose_matmul_casts_before_the_consumer(tmp_path):
    W = _w((6, 8), 6)
    mp = g_transpose_matmul()
    stats, _, path = _bind(tmp_path, mp, {"W": ("lin.weight", lambda: W)}, torch.bfloat16)
    assert stats == {"bound": 1, "cast": 1}
    t = _inits(mp)["lin.weight.T"]
    assert t.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(_stored(tmp_path, t), _bf16(W.t()))
    (cast,) = _cast_nodes(mp)
    assert list(cast.input) == ["lin.weight.T"]
    assert helper.get_attribute_value(cast.attribute[0]) == F32
    mm = next(n for n in mp.graph.node if n.op_type == "MatMul")
    assert mm.input[1] == cast.output[0]
    assert _producer_index(mp, cast.output[0]) < list(mp.graph.node).index(mm)
    assert (tmp_path / dedupe.WEIGHTS_FILE).stat().st_size == W.numel() * 2  # half the fp32 bytes
    X = _x((5, 8), 7)
    (y,) = _run(path, {"X": X})
    assert y.dtype == np.float32
    want = X.astype(np.float64) @ _bf16(W).T.astype(np.float64)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # and the rounding matters: the fp32 weights give a measurably different answer
    assert np.abs(X @ W.numpy().T - want).max() > 1e-3


def test_bf16_gather_casts_its_output_not_the_table(tmp_path):
    W = _w((10, 8), 8)
    mp = g_gather()
    stats, _, path = _bind(tmp_path, mp, {"W": ("model.embed_tokens.weight", lambda: W)}, torch.bfloat16)
    assert stats == {"bound": 1, "cast": 1}
    (cast,) = _cast_nodes(mp)
    gather = next(n for n in mp.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "model.embed_tokens.weight"  # the table is read in bf16
    assert list(cast.input) == [gather.output[0]] and cast.output[0] == "E"
    assert helper.get_attribute_value(cast.attribute[0]) == F32
    mul = next(n for n in mp.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "E"
    nodes = list(mp.graph.node)
    assert nodes.index(gather) < nodes.index(cast) < nodes.index(mul)
    ids = np.array([9, 1, 1, 4], dtype=np.int64)
    (y,) = _run(path, {"ids": ids})
    np.testing.assert_array_equal(y, _bf16(W)[ids] * 2)


def test_bf16_plain_and_transposed_each_cast_once(tmp_path):
    W = _w((6, 8), 9)
    mp = g_transpose_and_mul()
    stats, _, path = _bind(tmp_path, mp, {"W": ("lin.weight", lambda: W)}, torch.bfloat16)
    assert stats == {"bound": 2, "cast": 2}
    casts = {n.input[0]: n for n in _cast_nodes(mp)}
    assert set(casts) == {"lin.weight", "lin.weight.T"}
    nodes = list(mp.graph.node)
    mm = next(n for n in nodes if n.op_type == "MatMul")
    mul = next(n for n in nodes if n.op_type == "Mul")
    assert mm.input[1] == casts["lin.weight.T"].output[0]
    assert mul.input[1] == casts["lin.weight"].output[0]
    assert nodes.index(casts["lin.weight.T"]) < nodes.index(mm)
    assert nodes.index(casts["lin.weight"]) < nodes.index(mul)
    X, X2 = _x((5, 8), 10), _x((6, 8), 11)
    y, z = _run(path, {"X": X, "X2": X2})
    np.testing.assert_allclose(y, X.astype(np.float64) @ _bf16(W).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z, X2 * _bf16(W))


# ------------------------------------------------------------------------------ dedupe
def test_same_key_is_written_once_across_graphs(tmp_path):
    W = _w((6, 8), 12)
    calls = []

    def produce():
        calls.append(1)
        return W

    with WeightStore(tmp_path) as store:
        a, b = g_transpose_matmul(), g_transpose_matmul()
        bind_weights(a, {"W": ("shared.weight", produce)}, store)
        size1 = store.offset
        bind_weights(b, {"W": ("shared.weight", produce)}, store)
        assert store.offset == size1
        c = g_transpose_and_mul()  # the same key plain: a second, different tensor
        bind_weights(c, {"W": ("shared.weight", produce)}, store)
        st = store.stats()
    assert len(calls) == 2  # produced once per (key, transposed)
    assert st["unique_tensors"] == 2
    assert st["referenced_bytes"] == 4 * W.numel() * 4
    data = tmp_path / dedupe.WEIGHTS_FILE
    assert data.stat().st_size == st["external_bytes"] == 2 * W.numel() * 4
    ea, eb = (_inits(m)["shared.weight.T"] for m in (a, b))
    assert list(ea.external_data) == list(eb.external_data)  # both graphs point at the same bytes
    np.testing.assert_array_equal(_stored(tmp_path, ea), W.t().numpy())


def test_storage_dtype_is_part_of_the_key_and_large_tensors_are_page_aligned(tmp_path):
    small, big = _w((3, 5), 13), _w((512, 513), 14)  # 60 B, then 1.05 MiB
    with WeightStore(tmp_path) as store:
        e1 = store.put(("k", False, "torch.float32"), lambda: small)
        e2 = store.put(("k", False, "torch.bfloat16"), lambda: small.to(torch.bfloat16))
        e3 = store.put(("big", False, "torch.float32"), lambda: big)
        assert store.put(("k", False, "torch.float32"), lambda: pytest.fail("re-produced")) == e1
    assert (e1.length, e2.length) == (60, 30) and e2.offset % dedupe.ALIGN == 0 and e2.offset >= 60
    assert e3.offset % dedupe.PAGE == 0 and e3.offset > e2.offset + e2.length - 1
    assert (tmp_path / dedupe.WEIGHTS_FILE).stat().st_size == e3.offset + big.numel() * 4
    raw = (tmp_path / dedupe.WEIGHTS_FILE).read_bytes()
    np.testing.assert_array_equal(np.frombuffer(raw[e3.offset:], dtype=np.float32).reshape(512, 513), big.numpy())


def _wide_linear():
    mp = g_transpose_matmul()  # X [5, 50] @ W^T, W [6, 50]
    mp.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 50
    mp.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 50
    return mp


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_transposed_weight_written_in_row_blocks(tmp_path, monkeypatch, storage):
    """A transposed tensor is written block by block (``dedupe.BLOCK_BYTES``), never as a whole transposed
    copy; the stored bytes are still the full transpose."""
    W = _w((6, 50), 15)  # stored: 50 rows of 6; blocks of 7 fp32 rows (14 bf16 rows)
    monkeypatch.setattr(dedupe, "BLOCK_BYTES", 7 * 6 * 4)
    writes = []
    orig_put = WeightStore.put

    def put(self, key, make, transpose=False):
        f = self._f
        real = f.write
        self._f = type("W", (), {"write": lambda _, b: writes.append(len(b)) or real(b), "flush": f.flush,
                                 "fileno": f.fileno, "close": f.close})()
        try:
            return orig_put(self, key, make, transpose=transpose)
        finally:
            self._f = f

    monkeypatch.setattr(WeightStore, "put", put)
    mp = _wide_linear()
    _, _, path = _bind(tmp_path, mp, {"W": ("lin.weight", lambda: W)}, storage)
    t = _inits(mp)["lin.weight.T"]
    assert list(t.dims) == [50, 6]
    item = 2 if storage is torch.bfloat16 else 4
    data_writes = [n for n in writes if n]
    assert len(data_writes) > 1 and max(data_writes) <= 7 * 6 * 4 and sum(data_writes) == W.numel() * item
    want = W.t().numpy() if storage is None else _bf16(W.t())
    np.testing.assert_array_equal(_stored(tmp_path, t), want)
    X = _x((5, 50), 16)
    (y,) = _run(path, {"X": X})
    np.testing.assert_allclose(y, X.astype(np.float64) @ want, rtol=1e-5, atol=1e-5)
