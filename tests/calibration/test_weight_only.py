"""Weight-only fp8/int8: ModelOpt's graph minus the activation Q/DQ, and the weights unchanged."""
import numpy as np
import onnx
import pytest
import torch

from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.quantize import ort_session, quantized_matmuls
from mplus_deploy.calibration.sensitivity import fake_weight, targets
from mplus_deploy.calibration.weight_only import activation_qdq_count
from mplus_deploy.model import MPlus, preset

from .conftest import FAST
from .test_sensitivity import _dequantized_weight


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_weight_only_graph(calib_tiny_art, tmp_path, mode):
    import shutil

    out = tmp_path / "a"
    shutil.copytree(calib_tiny_art, out)  # a copy: the session fixture's manifest stays as other tests expect
    rep = quantize_artifact(out, mode, "builtin", progress=False, print_table=False, weight_only=True,
                            **dict(FAST, graphs=("decode",)))
    e = rep["quantization"]["decode"]
    path = out / e["file"]
    m = onnx.load(str(path))
    assert activation_qdq_count(m) == 0  # no activation quantization left ...
    done = quantized_matmuls(m)
    assert done and len(done) == e["quantized_nodes"] == e["weight_only_matmuls"]  # ... every weight still DQ'd
    ort_session(path, "basic")
    # the weights are ModelOpt's per-channel weights, untouched by the pass: equal to the simulation's
    # (tests/calibration/test_sensitivity.py checks the same against W8A8 graphs)
    model = MPlus.from_config(preset("tiny"))  # what calib_tiny_art exported (seed 0)
    for node, key in (("/layers.0/q_proj/base_layer/MatMul", "layers.0.q_proj"),
                      ("/layers.1/mlp/down_proj/base_layer/MatMul", "layers.1.down_proj")):
        w = targets(model)[key].weight.data
        got = torch.from_numpy(_dequantized_weight(path, node).astype(np.float32)).T
        sim = fake_weight(w, mode)
        scale = float(w.abs().max())
        assert float(((got - sim).abs() > 1e-6 * scale).float().mean()) <= 1e-3, (mode, node)  # rounding ties only
        assert float((got - w).abs().max()) > 0  # really quantized
    md = (out / "report" / f"quantization.{mode}.md").read_text()
    assert "## Weight-only" in md
    assert rep["end_to_end"]["top1_agreement"] >= 0.5


def test_weight_only_refused_for_int4(calib_tiny_art):
    with pytest.raises(ValueError, match="int4 is always weight-only"):
        quantize_artifact(calib_tiny_art, "int4", None, progress=False, print_table=False, weight_only=True, **FAST)
