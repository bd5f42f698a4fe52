"""The direct weight-only pass (weight_dq.py) writes ModelOpt's numbers without running ModelOpt."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration import weight_dq
from mplus_deploy.calibration.quantize import ort_session, quantized_matmuls

from .conftest import FAST


def _weights_by_node(path):
    """MatMul node name → (q bytes, scale, zero point, axis) of the DequantizeLinear feeding its weight."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        dq = prod.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        arrs = []
        for x in dq.input:
            t = inits[x]
            a = np.asarray(numpy_helper.to_array(t))
            arrs.append((t.data_type, a.view(np.uint8) if a.dtype.itemsize == 1 else a))
        out[n.name] = (arrs, {a.name: a.i for a in dq.attribute})
    return out, m


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_direct_pass_equals_modelopt_bit_for_bit(calib_tiny_art, tmp_path, mode):
    arts = {}
    for via in ("direct", "modelopt"):
        out = tmp_path / via
        shutil.copytree(calib_tiny_art, out)
        quantize_artifact(out, mode, "builtin", progress=False, print_table=False, report=False, weight_only=True,
                          weight_only_via=via, **dict(FAST, graphs=("prefill", "memory_project")))
        arts[via] = out
    for g in ("prefill", "memory_project"):
        (d, md), (m, mm) = (_weights_by_node(arts[v] / "graphs" / f"{g}.{mode}.onnx") for v in ("direct", "modelopt"))
        assert d and set(d) == set(m) == set(quantized_matmuls(mm))
        for node in d:
            (da, dattr), (ma, mattr) = d[node], m[node]
            assert dattr == mattr == {"axis": 1}
            for (dt_a, a), (dt_b, b) in zip(da, ma):  # quantized weight, scale, zero point
                assert dt_a == dt_b and a.shape == b.shape and np.array_equal(a, b), (g, node)
        assert not any(n.op_type == "QuantizeLinear" for n in md.graph.node)
        # ModelOpt duplicates a weight read by two MatMuls (k/v of the prompt and of the bos row); we keep one
        n_dq = lambda model: sum(n.op_type == "DequantizeLinear" for n in model.graph.node)  # noqa: E731
        assert n_dq(md) <= n_dq(mm)
        # and the graphs compute the same: random feeds, both at ORT_ENABLE_BASIC
        sd, sm = (ort_session(arts[v] / "graphs" / f"{g}.{mode}.onnx", "basic") for v in ("direct", "modelopt"))
        if g == "memory_project":
            rng = np.random.default_rng(0)
            shape = [d if isinstance(d, int) else 5 for d in sd.get_inputs()[0].shape]
            x = {sd.get_inputs()[0].name: rng.standard_normal(shape).astype(np.float32)}
            for a, b in zip(sd.run(None, x), sm.run(None, x)):
                np.testing.assert_array_equal(a, b)


def test_scales_follow_onnxruntime_rule():
    """Independent of ModelOpt: onnxruntime's own compute_scale_zp per channel (symmetric int8, -127..127),
    including an all-zero channel (scale 1) and a channel of one sign."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 7)).astype(np.float32) * rng.uniform(0.01, 3, 7).astype(np.float32)
    w[:, 2] = 0.0
    w[:, 3] = np.abs(w[:, 3])
    got = weight_dq.channel_scales(w, "int8")
    for c in range(w.shape[1]):
        zp, sc = compute_scale_zp(w[:, c].min(), w[:, c].max(), np.int8(-127), np.int8(127), symmetric=True)
        assert int(zp) == 0 and got[c] == np.float32(sc), c
    fp8 = weight_dq.channel_scales(w, "fp8")
    np.testing.assert_array_equal(fp8, (got * np.float32(448.0)) / np.float32(127.0))
    q = weight_dq.quantize_values(w, got, "int8")
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() == 127
    assert np.abs(q.astype(np.float32) * got - w).max() <= got.max() / 2 + 1e-7


def test_weight_read_by_an_unselected_node_stays_fp32():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y1"], name="/a/MatMul"),
             helper.make_node("MatMul", ["x", "w"], ["y2"], name="/b/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("y1", "y2")],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert weight_dq.apply(m, ["/a/MatMul"], "fp8", lambda name: w) == 1
    inits = {i.name: i for i in m.graph.initializer}
    assert inits["w"].data_type == TensorProto.FLOAT and inits["w_quantized"].data_type == TensorProto.FLOAT8E4M3FN
    assert [n.input[1] for n in m.graph.node if n.op_type == "MatMul"] == ["w_DequantizeLinear_Output", "w"]
    onnx.checker.check_model(m)
    import onnxruntime as ort

    x = rng.standard_normal((2, 4)).astype(np.float32)
    y1, y2 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y2, x @ w)
    assert 0 < np.abs(y1 - x @ w).max() < 0.2 * np.abs(x @ w).max()


def test_not_a_weight_is_refused():
    nodes = [helper.make_node("MatMul", ["x", "z"], ["y"], name="/a/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "z")],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(ValueError, match="2-D fp32 weight initializer"):
        weight_dq.apply(helper.make_model(g), ["/a/MatMul"], "int8", lambda name: None)


def test_bad_via_option(calib_tiny_art):
    with pytest.raises(ValueError, match="weight_only_via"):
        quantize_artifact(calib_tiny_art, "fp8", "builtin", progress=False, print_table=False, weight_only=True,
                          weight_only_via="fast", **FAST)


def test_gptq_of_shared_weights_is_solved_once(calib_tiny_art, tmp_path, monkeypatch):
    """decode and prefill read the same base weights: GPTQ solves each once (gptq.ResultCache) and both graphs
    get the same values."""
    from mplus_deploy.calibration import gptq as G
    from mplus_deploy.model import MPlus, preset

    calls = []
    real = G.solve
    monkeypatch.setattr(G, "solve", lambda W, *a, **k: calls.append(W.shape[0]) or real(W, *a, **k))
    out = tmp_path / "a"
    shutil.copytree(calib_tiny_art, out)
    model = MPlus.from_config(preset("tiny"))  # what calib_tiny_art exported (seed 0)
    rep = quantize_artifact(out, "int8", "builtin", model=model, progress=False, print_table=False, report=False,
                            weight_only=True, gptq=True, **dict(FAST, graphs=("decode", "prefill")))
    L = model.config.num_hidden_layers
    assert rep["quantization"]["graphs"]["decode"]["gptq_weights"] == rep["quantization"]["graphs"]["prefill"]["gptq_weights"] == 7 * L
    assert sum(calls) == 7 * L  # each distinct weight solved once, in batches of one shape
    assert len(calls) < 7 * L
    (dw, _), (pw, _) = (_weights_by_node(out / "graphs" / f"{g}.int8.onnx") for g in ("decode", "prefill"))
    node = "/layers.1/mlp/down_proj/base_layer/MatMul"
    assert np.array_equal(dw[node][0][0][1], pw[node][0][0][1])
    assert not list(out.glob(".quant-*"))  # the scratch folder with the cache file is gone


def _distinct_quantized_bytes(graphs) -> int:
    import onnx

    seen = {}
    for p in graphs:
        g = onnx.load(str(p), load_external_data=False).graph
        weights = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}  # not the fp8 zero points
        for init in g.initializer:
            if init.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT8) and init.name in weights:
                info = {e.key: e.value for e in init.external_data}
                seen[(info["location"], info.get("offset"), info.get("length"))] = int(info["length"])
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_weight_dq_folding_changes_no_number(mode, request):
    """On the CPU the weight DQs of every fp8 graph (and of weight-only int8 ones) are folded to fp32 once
    (ort_dequant), one copy per distinct weight for all graphs: the same outputs of every graph as onnxruntime's
    own DQs, the same tokens. Both fixtures are ModelOpt's W8A8: fp8's weight DQs are folded all the same (no
    fp8 kernel to fuse into), int8's stay (ORT fuses them into integer kernels);
    weight-only int8 folding is checked bit for bit in tests/runtime/test_ort_dequant.py."""
    import torch

    from mplus_deploy.runtime import Engine
    from mplus_deploy.artifact.graph_io import last_row
    from mplus_deploy.runtime.kvcache import DecodeCache

    out, rep = request.getfixturevalue(f"{mode}_art")
    engines = [Engine(out, backend="onnxruntime", quantized=mode, seed=2, fold_dq=f) for f in (None, ())]
    d, plain = engines[0].describe(), engines[1].describe()
    fp8_graphs = [g for g in ("memory_update", "memory_update_short", "memory_project", "prefill", "decode")
                  if g in plain["quantized_graphs"]]
    assert d["fold_dq"] == fp8_graphs and plain["fold_dq"] == [] and len(fp8_graphs) >= 2
    L = engines[0].config.num_hidden_layers
    assert d["folded_dq_nodes"]["decode"] == (7 * L if mode == "fp8" else 0) and plain["folded_dq_nodes"] == {}
    files = [out / "graphs" / f"{g}.{mode}.onnx" for g in fp8_graphs]
    assert json.loads((out / "manifest.json").read_text())["quantized"][mode]["scheme"]["name"] == "modelopt-default"
    assert d["folded_fp32_bytes"] == (4 * _distinct_quantized_bytes(files) if mode == "fp8" else 0)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    toks = [e.generate_ids(ids, max_new_tokens=8, stop_at_eos=False) for e in engines]
    assert torch.equal(toks[0], toks[1])
    outs = []
    for e in engines:
        feeds = e.host_memory.prefill_feeds()
        o = e.runner.infer("prefill", {"ids": ids, "logit_rows": last_row(ids), **feeds})
        cache = DecodeCache(o["present_k"], o["present_v"], e.config.prefix_len)
        dec = e.runner.infer("decode", {"ids": torch.tensor([7]), "pos": torch.tensor(e.config.prefix_len + 8),
                                        **cache.feeds()})
        outs.append([o["logits"], dec["logits"]])
    for a, b in zip(*outs):
        assert torch.equal(a, b) and float(a.abs().max()) > 0
    with pytest.raises(ValueError, match="fold_dq names unknown graphs"):
        Engine(out, backend="onnxruntime", quantized=mode, fold_dq=("decoder",))
    with pytest.raises(ValueError, match="needs share_weights=True"):
        Engine(out, backend="onnxruntime", quantized=mode, fold_dq=("decode",), share_weights=False)
    for e in engines:
        e.close()
