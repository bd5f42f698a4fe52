"""Calibration data, capture, node selection and the quantized tiny artifact (fp8 / int8 / int4).

Bounds are for the random-weight ``tiny`` preset on a handful of samples; the demo-level acceptance
numbers (hundreds of positions) are produced by ``quantize_artifact`` reports and bench/quant.py.
"""
import json

import numpy as np
import onnx
import pytest

from mplus_deploy.calibration import CalibrationError, heldout_texts, load_texts, quantize_artifact, select_nodes
from mplus_deploy.calibration.capture import capture
from mplus_deploy.calibration.data import BUILTIN_PATH, encoder
from mplus_deploy.calibration.quantize import QuantOptions, ort_session, quantized_matmuls, trt_parse


# ------------------------------------------------------------------------------------ data
def test_builtin_corpus_and_caps():
    t = load_texts("builtin")
    assert 30 <= len(t) <= 60
    assert all(len(x.split()) > 20 for x in t)
    assert len(load_texts("builtin", max_samples=5)) == 5
    assert BUILTIN_PATH.name == "calib_builtin.txt"


def test_heldout_is_disjoint_from_calibration():
    cal = load_texts("builtin")
    held = heldout_texts(cal)
    assert len(held) >= 20
    assert not {" ".join(x.split()) for x in held} & {" ".join(x.split()) for x in cal}
    # a user calibration file that contains held-out paragraphs: they are dropped from the evaluation
    assert len(heldout_texts(held[:3] + cal)) == len(held) - 3


def test_txt_and_jsonl(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first para\nline two\n\n\nsecond para\n")
    assert load_texts(str(p)) == ["first para line two", "second para"]
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert load_texts(j) == ["a b", "c"]
    j.write_text('{"txt": 1}\n')
    with pytest.raises(CalibrationError, match="text"):
        load_texts(j)
    j.write_text("{not json\n")
    with pytest.raises(CalibrationError, match="JSON"):
        load_texts(j)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match="no text"):
        load_texts(tmp_path / "e.txt")


def test_refuses_fp8_int8_without_calibration(calib_tiny_art):
    for mode in ("fp8", "int8"):
        with pytest.raises(CalibrationError, match="--calib"):
            quantize_artifact(calib_tiny_art, mode, None, progress=False)
    with pytest.raises(ValueError, match="never quantized"):
        quantize_artifact(calib_tiny_art, "fp8", "builtin", graphs=("retriever",), progress=False)
    with pytest.raises(ValueError, match="mode"):
        quantize_artifact(calib_tiny_art, "fp4", "builtin", progress=False)
    with pytest.raises(ValueError, match="max' or 'entropy"):
        quantize_artifact(calib_tiny_art, "int8", "builtin", calib_method="awq_clip", progress=False)
    with pytest.raises(ValueError, match="unknown quantization options"):
        quantize_artifact(calib_tiny_art, "int8", "builtin", block=3, progress=False)
    with pytest.raises(ValueError, match="lm_head_bits must be 4 or 8"):
        quantize_artifact(calib_tiny_art, "int4", None, calib_method="rtn_asym", quantize_lm_head=True,
                          lm_head_bits=6, progress=False)
    with pytest.raises(ValueError, match="int4 rtn_asym option"):
        quantize_artifact(calib_tiny_art, "int8", "builtin", quantize_lm_head=True, lm_head_bits=8, progress=False)
    with pytest.raises(ValueError, match="without quantize_lm_head"):
        quantize_artifact(calib_tiny_art, "int4", None, calib_method="rtn_asym", lm_head_bits=8, progress=False)


# ------------------------------------------------------------------------------------ capture / selection
def test_capture_covers_graphs_with_real_rows(calib_tiny_art):
    cap = capture(calib_tiny_art, load_texts("builtin", 4), encoder(None, 256), max_tokens=48, n_decode=3, max_per_graph=6)
    f = cap["feeds"]
    for g in ("memory_update", "memory_update_short", "memory_project", "prefill", "decode"):
        assert f[g], g
    assert all(x["ids"].shape[0] > 1 for x in f["prefill"])  # M > 1 rows (no GEMV exclusion)
    assert all(x["ids"].shape[0] >= 8 for x in f["memory_update"])  # T >= K
    assert all(x["ids"].shape[0] < 8 for x in f["memory_update_short"])
    assert all(x["ids"].shape == (1,) for x in f["decode"])
    assert len(f["decode"]) <= 6 and cap["calls"]["decode"] == 4 * 3  # reservoir cap, every step seen


def test_select_nodes_excludes_scores_lm_head_retriever_lora(calib_tiny_art):
    m = onnx.load(str(calib_tiny_art / "graphs" / "prefill.onnx"), load_external_data=False)
    sel, excl = select_nodes(m, QuantOptions())
    assert sel and not any("lm_head" in n or "retrieval" in n or "lora_" in n for n in sel)
    assert "/lm_head/MatMul" in excl and "/layers.0/retrieval/MatMul" in excl and "/layers.0/MatMul" in excl
    sel2, _ = select_nodes(m, QuantOptions(quantize_lm_head=True, quantize_retriever=True, quantize_lora=True))
    assert "/lm_head/MatMul" in sel2 and "/layers.0/retrieval/query_proj/query_proj.0/MatMul" in sel2
    assert "/layers.0/retrieval/MatMul" not in sel2 and "/layers.0/MatMul" not in sel2  # scores: never


# ------------------------------------------------------------------------------------ quantized artifacts
def _feeds(out, graph, n=4):
    cap = capture(out, heldout_texts()[:2], encoder(None, 256), max_tokens=40, n_decode=2, max_per_graph=n, seed=3)
    return cap["feeds"][graph]


def _check_graph(out, rep, graph, tol_rel):
    """ORT BASIC vs DISABLE_ALL (same numbers) and quantized vs fp32 within tol_rel x output scale."""
    q = rep["quantization"][graph]
    path = out / q["file"]
    onnx.checker.check_model(str(path))
    assert q["quantized_nodes"] == q["selected"] > 0
    fp = ort_session(out / "graphs" / f"{graph}.onnx", "basic")
    basic, off = ort_session(path, "basic"), ort_session(path, "disable")
    names = [o.name for o in fp.get_outputs()]
    for f in _feeds(out, graph):
        a, b, c = fp.run(names, f), basic.run(names, f), off.run(names, f)
        for n, x, y, z in zip(names, a, b, c):
            if not np.issubdtype(x.dtype, np.floating):
                continue
            scale = max(1.0, float(np.abs(x).max()))
            assert np.abs(y - z).max() <= 1e-4 * scale, (graph, n, "BASIC != DISABLE_ALL")
            if n in ("logits", "delta", "keys"):  # max: a flipped retrieval moves a few positions a lot
                d = np.abs(x - y)
                assert d.max() <= tol_rel * scale, (graph, n, float(d.max()), scale)
                assert d.mean() <= 0.2 * tol_rel * scale, (graph, n, float(d.mean()), scale)


def test_fp8_artifact(fp8_art):
    out, rep = fp8_art
    m = json.loads((out / "manifest.json").read_text())
    sec = m["quantized"]["fp8"]
    assert set(sec["graphs"]) == {"memory_update", "memory_update_short", "memory_project", "prefill", "decode"}
    from mplus_deploy.artifact import load_manifest

    load_manifest(out, verify=True)  # sha256 of the new files recorded
    for g in sec["graphs"].values():
        assert g["file"] in m["files"]
    assert sec["data_file"] in m["files"] and "report/quantization.json" in m["files"]
    qm = onnx.load(str(out / sec["graphs"]["decode"]["file"]), load_external_data=False)
    types = {i.data_type for i in qm.graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in types
    assert {n.op_type for n in qm.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    # lm_head / retrieval / LoRA stay fp32
    done = quantized_matmuls(onnx.load(str(out / sec["graphs"]["prefill"]["file"])))
    assert not any("lm_head" in n or "retrieval" in n or "lora_" in n for n in done)
    # the fp32 weights are referenced, not copied
    assert sec["weights"]["reused_fp32_bytes"] > 0
    for g in ("memory_update", "prefill", "decode"):
        _check_graph(out, rep, g, 0.1)
    e = rep["end_to_end"]
    assert e["positions"] >= 60 and e["top1_agreement"] >= 0.85 and e["kl_mean"] < 0.05
    assert e["retrieval"]["overlap_mean"] >= 0.8
    assert rep["report_md"].startswith("# Quantization report: fp8")


def test_int8_artifact(int8_art):
    out, rep = int8_art
    qm = onnx.load(str(out / rep["quantization"]["decode"]["file"]), load_external_data=False)
    assert onnx.TensorProto.INT8 in {i.data_type for i in qm.graph.initializer}
    for g in ("prefill", "decode"):
        _check_graph(out, rep, g, 0.15)
    assert rep["end_to_end"]["top1_agreement"] >= 0.9
    assert rep["calibration"]["method"] == "max"


def test_int4_artifact(int4_art):
    out, rep = int4_art
    assert rep["calibration"]["method"] == "rtn_dq"  # no calibration data: data-free RTN
    qm = onnx.load(str(out / rep["quantization"]["decode"]["file"]), load_external_data=False)
    assert onnx.TensorProto.INT4 in {i.data_type for i in qm.graph.initializer}
    for g in ("prefill", "decode"):
        _check_graph(out, rep, g, 0.2)
    # MatMulNBits fusion (ENABLE_ALL) with accuracy level 1 reproduces the BASIC result
    path = out / rep["quantization"]["decode"]["file"]
    basic, fused = ort_session(path, "basic"), ort_session(path, "all", **{"session.qdq_matmulnbits_accuracy_level": "1"})
    for f in _feeds(out, "decode", 2):
        a, b = basic.run(["logits"], f)[0], fused.run(["logits"], f)[0]
        assert np.abs(a - b).max() <= 1e-3 * max(1.0, float(np.abs(a).max()))
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["quantized"]) == {"fp8", "int8", "int4"}


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_tensorrt_rtx_parses(mode, fp8_art, int8_art):
    pytest.importorskip("tensorrt_rtx")
    out, rep = {"fp8": fp8_art, "int8": int8_art}[mode]
    for g, q in rep["quantization"].items():
        assert trt_parse(out / q["file"]) == "ok", g


def test_report_markdown_has_the_retention_rows_when_measured():
    """The report's retention section (issue 20): one row per graph set with N = 0 and 10; absent when not measured."""
    from mplus_deploy.calibration.report import _retention_md

    assert _retention_md({}) == []
    ret = {"fp32": {"rate": {"0": 0.75, "10": 0.25}, "hits": {"0": 9, "10": 3}, "facts": 12, "seconds": 40.0},
           "int4": {"rate": {"0": 0.5, "10": 1 / 12}, "hits": {"0": 6, "10": 1}, "facts": 12, "seconds": 30.2}}
    md = "\n".join(_retention_md({"retention": ret}))
    assert "| graphs | N=0 | N=10 | seconds |" in md
    assert "| fp32 | 75% (9/12) | 25% (3/12) | 40 |" in md and "| int4 | 50% (6/12) | 8% (1/12) | 30 |" in md
