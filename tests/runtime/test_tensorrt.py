"""TensorRT runner. Building / running engines needs TensorRT >= 11 and a GPU: skipped here with the reason.
The optimization-profile derivation from the manifest is pure Python and always tested."""
import json

import pytest
import torch

from mplus_deploy.runtime.backends import tensorrt_importable
from mplus_deploy.artifact.graph_io import profile_shapes
from mplus_deploy.runtime.backends.tensorrt_runner import INSTALL_HINT


def test_profiles_from_manifest(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    prof = profile_shapes(m["graphs"]["prefill"])
    mn, opt, mx = prof["ltm_keys.1"]  # format v3: the LTM per layer, [S, d_r]
    assert mn[0] <= opt[0] <= mx[0] and mx[0] == m["limits"]["max_ltm"] and mn[1] == mx[1]
    assert prof["logit_rows"] == ((1,), (1,), (m["limits"]["max_prompt"],))
    mn, _, mx = profile_shapes(m["graphs"]["memory_update"])["ids"]
    assert mn == (8,) and mx == (32,)
    mn, _, mx = profile_shapes(m["graphs"]["memory_update_short"])["ids"]
    assert mn == (1,) and mx == (7,)
    # decode (format v2): the per-layer memory prefix is static, the tail spans one row to max_window - 1
    dec = profile_shapes(m["graphs"]["decode"])
    from mplus_deploy.model.config import MPlusConfig

    P, W = m["memory"]["P"], MPlusConfig.from_dict(m["config"]).max_window
    assert set(dec["prefix_k.1"]) == {(2, P, 16)} and dec["past_v.0"][0] == (2, 1, 16) and dec["past_v.0"][2] == (2, W - 1, 16)


needs_trt = pytest.mark.skipif(not (tensorrt_importable() and torch.cuda.is_available()),
                               reason=f"TensorRT engines cannot be built here: {INSTALL_HINT}")


@needs_trt
def test_tensorrt_engine_matches_onnxruntime(tiny_artifact):
    from mplus_deploy.runtime import Engine

    t = Engine(tiny_artifact, backend="tensorrt", device="cuda", seed=1)
    o = Engine(tiny_artifact, backend="onnxruntime", seed=1)
    ids = torch.arange(40) % 200
    t.memorize(ids, progress=False)
    o.memorize(ids, progress=False)
    torch.testing.assert_close(t.host_memory.state.stm, o.host_memory.state.stm, atol=1e-3, rtol=1e-3)
    p = torch.tensor([3, 4, 5])
    assert torch.equal(t.generate_ids(p, max_new_tokens=8), o.generate_ids(p, max_new_tokens=8))
    assert (tiny_artifact / "engines").is_dir()


@needs_trt
def test_tensorrt_registers_and_runs_the_retrieval_plugins(tmp_path):
    """A ``--retrieval-op plugin`` artifact: TrtRunner registers the mplus plugins before parsing, its engines
    hold them, and its retrieved rows and tokens equal ONNX Runtime's (which lowers the same nodes)."""
    from mplus_deploy.build import export_artifact
    from mplus_deploy.runtime import Engine

    from .conftest import tiny_model

    art = tmp_path / "plugin"
    export_artifact(tiny_model(), art, retrieval_op="plugin")
    t = Engine(art, backend="tensorrt", device="cuda", seed=1)
    assert t.runner.describe()["plugins"] == ["mplus::MemoryGather", "mplus::TopKRetrieve"]
    o = Engine(art, backend="onnxruntime", seed=1)
    ids = torch.arange(300) % 200
    t.memorize(ids, progress=False)
    o.memorize(ids, progress=False)
    p = torch.tensor([3, 4, 5])
    assert torch.equal(t.generate_ids(p, max_new_tokens=8), o.generate_ids(p, max_new_tokens=8))
