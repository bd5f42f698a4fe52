"""Weight-only fp8/int8: ModelOpt's graph minus the activation Q/DQ, and the weights unchanged."""
import numpy as np
import onnx
import pytest

from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.quantize import ort_session, quantized_matmuls
from mplus_deploy.calibration.weight_only import activation_qdq_count

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
    # the dequantized weights are what ModelOpt computed for W8A8 (weights untouched by the pass)
    w_only = _dequantized_weight(path, "/layers.0/q_proj/base_layer/MatMul")
    assert np.isfinite(w_only).all() and w_only.shape[0] > 0
    md = (out / "report" / f"quantization.{mode}.md").read_text()
    assert "## Weight-only" in md
    assert rep["end_to_end"]["top1_agreement"] >= 0.5


def test_weight_only_refused_for_int4(calib_tiny_art):
    with pytest.raises(ValueError, match="int4 is always weight-only"):
        quantize_artifact(calib_tiny_art, "int4", None, progress=False, print_table=False, weight_only=True, **FAST)
