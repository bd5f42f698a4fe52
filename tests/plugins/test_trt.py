import subprocess
import sys
import textwrap

import pytest

from mplus_deploy.plugins import onnx_ops as O
from mplus_deploy.plugins import trt as P

K, D = 32, 16


def test_trt_module_reports_availability():
    assert isinstance(P.available(), bool)
    if not P.available():
        assert "tensorrt" in P.unavailable_reason()
        with pytest.raises(RuntimeError):
            P.register_plugins()


@pytest.mark.skipif(not P.available(), reason=f"full TensorRT absent: {P.unavailable_reason()}")
def test_qdp_registration():  # pragma: no cover - needs full TensorRT
    P.register_plugins()
    P.register_plugins()  # idempotent


rtx = pytest.mark.skipif(not P.rtx_available(), reason="tensorrt_rtx not installed")


@rtx
def test_rtx_builds_lowered_graph_with_dynamic_S_profile():
    m = O.lower_retrieval(O.build_retrieval_model(K, D, with_gather=True, H=8, custom=True))
    prof = {"q": ((1, D), (16, D), (64, D)), "keys": ((K, D), (600, D), (8192, D)),
            "ages": ((K,), (600,), (8192,)), "pool": ((K, 8), (600, 8), (8192, 8))}
    assert P.rtx_build(m.SerializeToString(), prof) > 0


@rtx
def test_rtx_custom_op_without_registration_reports_plugin_not_found(tmp_path):
    path = tmp_path / "custom.onnx"
    path.write_bytes(O.build_retrieval_model(K, D, custom=True).SerializeToString())
    code = textwrap.dedent(f"""
        from mplus_deploy.plugins import trt as P
        ok, errors, _ = P.rtx_parse(open({str(path)!r}, "rb").read())
        print("OK" if ok else "FAILED", *errors, sep="\\n")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "FAILED" in p.stdout and "Plugin not found" in p.stdout, p.stdout
