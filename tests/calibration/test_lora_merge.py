"""Folding LoRA branches into the base weights before quantization: exact in fp32, then one quantized weight."""
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.capture import capture
from mplus_deploy.calibration.data import encoder, heldout_texts
from mplus_deploy.artifact.lora_merge import merge
from mplus_deploy.calibration.quantize import QuantOptions, ort_session, quantized_matmuls, select_nodes
from mplus_deploy.model import MPlus, preset

from .conftest import FAST


@pytest.fixture(scope="module")
def lora_art(tmp_path_factory):
    """tiny with *non-zero* LoRA B (the demo's are zero, which would make the merge trivially exact)."""
    from mplus_deploy.build import export_artifact

    m = MPlus.from_config(preset("tiny"), seed=3)
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if hasattr(mod, "lora_B"):
            for lin in mod.lora_B.values():
                lin.weight.data = 0.05 * torch.randn(lin.weight.shape, generator=g)
    out = tmp_path_factory.mktemp("lora") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(m, out, validate=False, source={"preset": "tiny"})
    return out


@pytest.mark.parametrize("graph", ["decode", "prefill", "memory_update"])
def test_merge_is_exact_in_fp32(lora_art, tmp_path, graph):
    src = onnx.load(str(lora_art / "graphs" / f"{graph}.onnx"), load_external_data=True)
    onnx.save_model(src, str(tmp_path / "orig.onnx"))
    sel, _ = select_nodes(src, QuantOptions())
    n = merge(src, sel)
    assert n > 0 and not any("lora_A" in x.name or "lora_B" in x.name for x in src.graph.node)  # all folded
    onnx.checker.check_model(src)
    onnx.save_model(src, str(tmp_path / "merged.onnx"))
    a, b = ort_session(tmp_path / "orig.onnx", "basic"), ort_session(tmp_path / "merged.onnx", "basic")
    names = [o.name for o in a.get_outputs()]
    feeds = capture(lora_art, heldout_texts()[:2], encoder(None, 256), max_tokens=40, n_decode=2, max_per_graph=3,
                    seed=2)["feeds"][graph]
    assert feeds
    for f in feeds:
        for name, x, y in zip(names, a.run(names, f), b.run(names, f)):
            if np.issubdtype(x.dtype, np.floating):
                assert np.abs(x - y).max() <= 1e-4 * max(1.0, float(np.abs(x).max())), (graph, name)


def test_merged_int4_artifact(lora_art, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(lora_art, out)
    rep = quantize_artifact(out, "int4", None, progress=False, print_table=False, merge_lora=True,
                            **dict(FAST, graphs=("decode",)))
    q = rep["quantization"]["decode"]
    assert q["lora_merged"] > 0 and q["quantized_nodes"] == q["selected"]
    qm = onnx.load(str(out / q["file"]), load_external_data=False)
    assert not any("lora_A" in n.name or "lora_B" in n.name for n in qm.graph.node)
    assert len(quantized_matmuls(qm)) == q["selected"]
    assert rep["end_to_end"]["top1_agreement"] >= 0.8  # int4 of W + sBA vs the fp32 graph with the branch


@pytest.mark.parametrize("graph", ["prefill", "memory_update"])
def test_deferred_fold_equals_eager_fold(lora_art, graph):
    """rtn_asym quantizes the folded weights as they are built (merge(defer=True)): the same int4 graph as
    folding them into the graph first, tensor for tensor, and no data-less stub left behind."""
    from onnx import numpy_helper

    from mplus_deploy.calibration.asym_int4 import apply as asym_apply

    src = lora_art / "graphs" / f"{graph}.onnx"
    eager = onnx.load(str(src), load_external_data=True)
    sel, _ = select_nodes(eager, QuantOptions())
    assert merge(eager, sel) > 0
    asym_apply(eager, sel)
    lazy = onnx.load(str(src), load_external_data=False)
    n, folded = merge(lazy, sel, base_dir=src.parent, defer=True)
    assert n > 0 and len(folded.parts) > 0
    asym_apply(lazy, sel, base_dir=str(src.parent), weights=folded)
    assert [x.name for x in eager.graph.node] == [x.name for x in lazy.graph.node]
    ea = {i.name: numpy_helper.to_array(i) for i in eager.graph.initializer}
    la = {i.name: numpy_helper.to_array(i, base_dir=str(src.parent)) for i in lazy.graph.initializer}
    assert set(ea) == set(la) and not any(name in folded for name in la)
    for name in ea:
        assert np.array_equal(ea[name], la[name]), name
