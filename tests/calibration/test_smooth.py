"""Channel smoothing (SmoothQuant / AWQ-style scaling): an exact graph rewrite, simulated and applied consistently."""
import shutil

import numpy as np
import onnx
import pytest
import torch

from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.capture import capture
from mplus_deploy.calibration.data import encoder, heldout_texts, load_texts
from mplus_deploy.calibration.quantize import QuantOptions, ort_session, select_nodes
from mplus_deploy.calibration.sensitivity import Simulator, fake_weight, simulated, targets
from mplus_deploy.calibration.smooth import apply_file, module_of, prepare, smooth_scales
from mplus_deploy.model import MPlus, preset

from .conftest import FAST


def test_module_of_maps_every_target_node(calib_tiny_art):
    m = onnx.load(str(calib_tiny_art / "graphs" / "prefill.onnx"), load_external_data=False)
    sel, _ = select_nodes(m, QuantOptions())
    mods = {module_of(n) for n in sel}
    assert None not in mods  # every quantizable MatMul belongs to a target module
    assert mods == set(targets(MPlus.from_config(preset("tiny"))))
    assert module_of("/layers.0/bos/k_proj/base_layer/MatMul") == "layers.0.k_proj"
    assert module_of("/lm_head/MatMul") is None and module_of("/layers.0/q_proj/lora_A.default/MatMul") is None


@pytest.mark.parametrize("graph", ["prefill", "memory_update"])
def test_rewrite_preserves_the_function(calib_tiny_art, tmp_path, graph):
    src = onnx.load(str(calib_tiny_art / "graphs" / f"{graph}.onnx"), load_external_data=True)
    path = tmp_path / f"{graph}.onnx"
    onnx.save_model(src, str(path))
    sel, _ = select_nodes(src, QuantOptions())
    g = torch.Generator().manual_seed(0)
    model = MPlus.from_config(preset("tiny"))
    amax = {n: torch.rand(lin.weight.shape[1], generator=g) * 10 for n, lin in targets(model).items()}
    scales = smooth_scales(model, amax, 0.7)
    shutil.copy(path, tmp_path / "orig.onnx")
    n = apply_file(path, scales, sel)
    assert n == len(sel)
    rewritten = onnx.load(str(path))
    onnx.checker.check_model(rewritten)
    muls = [x for x in rewritten.graph.node if x.op_type == "Mul" and x.name.endswith("/smooth/Mul")]
    assert 0 < len(muls) < n  # q/k/v (and gate/up) share one Mul per input
    a, b = ort_session(tmp_path / "orig.onnx", "basic"), ort_session(path, "basic")
    names = [o.name for o in a.get_outputs()]
    feeds = capture(calib_tiny_art, heldout_texts()[:2], encoder(None, 256), max_tokens=40, n_decode=2,
                    max_per_graph=3, seed=1)["feeds"][graph]
    for f in feeds:
        for name, x, y in zip(names, a.run(names, f), b.run(names, f)):
            if np.issubdtype(x.dtype, np.floating):
                assert np.abs(x - y).max() <= 1e-4 * max(1.0, float(np.abs(x).max())), (graph, name)


def test_scales_and_simulation():
    model = MPlus.from_config(preset("tiny"))
    enc = encoder(None, model.config.vocab_size)
    texts = load_texts("builtin", 3)
    sm = prepare(model, enc, texts, 0.8, max_tokens=40)
    n = "layers.1.down_proj"
    lin = targets(model)[n]
    xa, wa = sm["channel_amax"][n], lin.weight.abs().amax(0)
    assert torch.allclose(sm["scales"][n], (xa.clamp_min(1e-5) ** 0.8 / wa.clamp_min(1e-5) ** 0.2).clamp(1e-4, 1e4))
    q, k = sm["scales"]["layers.0.q_proj"], sm["scales"]["layers.0.k_proj"]
    assert q is k  # q/k/v read the same activation: one s (max of their weights' channel amax)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(model, sm["channel_amax"], 1.5)
    sim = Simulator(model, enc, texts, "int8", max_tokens=40, prompt_len=40, scales=sm["scales"])
    assert sim.amax[n] == pytest.approx(float((xa / sm["scales"][n]).max()))
    w0 = lin.weight.data.clone()
    with simulated(model, "int8", sim.amax, {1}, scales=sm["scales"]):
        s = sm["scales"][n]
        assert torch.equal(lin.weight.data, fake_weight(w0 * s, "int8") / s)
    assert torch.equal(lin.weight.data, w0)
    other = Simulator(model, enc, texts[:1], "int8", max_tokens=40, prompt_len=40, calib_texts=texts[1:])
    assert other.amax[n] == pytest.approx(float(prepare(model, enc, texts[1:], 0.5, 40)["channel_amax"][n].max()))


def test_smoothed_int8_artifact(tmp_path, calib_tiny_art):
    out = tmp_path / "tiny"
    shutil.copytree(calib_tiny_art, out)  # may already hold other quantized modes (session fixtures)
    model = MPlus.from_config(preset("tiny"))
    rep = quantize_artifact(out, "int8", "builtin", model=model, progress=False, print_table=False, smooth_alpha=0.8,
                            trt_parse=False, **dict(FAST, graphs=("prefill", "decode")))
    assert rep["smoothing"]["alpha"] == 0.8
    for g in ("prefill", "decode"):
        q = rep["quantization"][g]
        assert q["smoothed_matmuls"] == q["quantized_nodes"] == q["selected"] > 0
        qm = onnx.load(str(out / q["file"]), load_external_data=False)
        assert any(n.name.endswith("/smooth/Mul") for n in qm.graph.node)
    e = rep["end_to_end"]
    assert e["top1_agreement"] >= 0.9 and e["kl_mean"] < 0.05
    assert "## Channel smoothing" in (out / "report" / "quantization.int8.md").read_text()
    with pytest.raises(ValueError, match="torch reference"):
        quantize_artifact(out, "int8", "builtin", progress=False, print_table=False, smooth_alpha=0.8, **FAST)
