"""``--retrieval-op plugin`` (issue 17): the retrieval written as mplus::TopKRetrieve + mplus::MemoryGather nodes,
run by ONNX Runtime through the load-time lowering, equal to the standard-op artifact of the same model."""
import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

from mplus_deploy.build import export_artifact
from mplus_deploy.export import prefill, retriever
from mplus_deploy.export.common import Limits
from mplus_deploy.model import MPlus, preset
from mplus_deploy.plugins import trt as P
from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends.onnxruntime_runner import OrtRunner
from mplus_deploy.artifact import load_manifest


def _model(kind):
    return MPlus.from_config(preset(kind), seed=0)


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request, tmp_path_factory):
    """(model, standard artifact, plugin artifact) of one preset, both validated on export."""
    m = _model(request.param)
    d = tmp_path_factory.mktemp(f"plug-{request.param}")
    export_artifact(m, d / "std")
    rep = export_artifact(m, d / "plugin", retrieval_op="plugin")
    assert all(g.validation is not None and g.validation.ok for g in rep.graphs)
    return m, d / "std", d / "plugin"


def _runner(art):
    r = OrtRunner(art, load_manifest(art), threads=2)
    r.activate()
    return r


def test_plugin_graphs_hold_the_custom_nodes(pair):
    m, _, plug = pair
    L, K0 = m.config.num_hidden_layers, m.config.K0
    man = json.loads((plug / "manifest.json").read_text())
    assert man["retrieval_op"] == "plugin"
    assert man["graphs"]["prefill"]["custom_ops"] == ["mplus::MemoryGather", "mplus::TopKRetrieve"]
    assert man["graphs"]["retriever"]["custom_ops"] == ["mplus::TopKRetrieve"]
    assert "custom_ops" not in man["graphs"]["decode"]
    g = onnx.load(str(plug / "graphs" / "prefill.onnx"), load_external_data=False)
    custom = [n for n in g.graph.node if n.domain == "mplus"]
    topk = [n for n in custom if n.op_type == "TopKRetrieve"]
    gathers = [n for n in custom if n.op_type == "MemoryGather"]
    assert [n.name for n in topk] == [f"/layers.{l}/retrieval/TopKRetrieve" for l in range(L)]
    assert len(gathers) == 2 * L
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in topk[0].attribute}
    assert attrs == {"k": K0, "score_chunks": 1, "plugin_namespace": b"mplus", "plugin_version": b"1"}
    assert len(topk[0].input) == 5  # q, keys, valid_len, ages, merged_len
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in gathers for a in n.attribute if a.name == "axis")
    # no standard-op retrieval left: the scope keeps only the query projection (norm, MatMul, SiLU, MatMul)
    assert not [n.name for n in g.graph.node if n.op_type in ("TopK", "Where", "Concat") and "/retrieval/" in n.name]
    assert not [n.name for n in g.graph.node if n.op_type == "Gather" and n.input[0].startswith(("ltm_k.", "ltm_v."))]
    assert {(o.domain, o.version) for o in g.opset_import} == {("", 21), ("mplus", 1)}


def test_plugin_artifact_equals_standard_artifact(pair):
    """Per graph, on the validation cases (top-k with pending rows, the small-LTM branch with pending rows
    present, exactly K0 rows) and extra seeds: indices and logits equal the standard-op artifact's exactly."""
    m, std, plug = pair
    a, b = _runner(std), _runner(plug)
    assert b.describe()["lowered_custom_ops"] == ["retriever", "prefill"] and a.describe()["lowered_custom_ops"] == []
    lim = Limits.from_config(m.config)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        for case in prefill.validation_cases(m.config, lim):
            f, _ = prefill.sample(m, g, case)
            x, y = a.infer("prefill", f), b.infer("prefill", f)
            assert torch.equal(x["retrieved"], y["retrieved"]), case
            assert torch.equal(x["logits"], y["logits"]), case
            assert torch.equal(x["present_k"], y["present_k"]) and torch.equal(x["present_v"], y["present_v"])
        for case in retriever.validation_cases(m.config, lim):
            f = retriever.sample(m.config, g, case, m.dtype)
            assert torch.equal(a.infer("retriever", f)["indices"], b.infer("retriever", f)["indices"]), case


def test_plugin_artifact_engine_tokens_equal(pair):
    """End to end through Engine: memorize past an LTM merge, then greedy generation."""
    m, std, plug = pair
    out = []
    V = m.config.vocab_size
    doc = torch.randint(3, V, (12 * m.config.K + 5,), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(3, V, (24,), generator=torch.Generator().manual_seed(6))
    for art in (std, plug):
        s = Engine(art, backend="onnxruntime", threads=2, seed=0).session(seed=0)
        s.memorize(doc, progress=False)
        out.append(s.generate_ids(ids, 8, stop_at_eos=False))
    assert torch.equal(out[0], out[1])


def test_cli_retrieval_op_plugin_and_refusals(tmp_path):
    from mplus_deploy.cli.export import main

    assert main(["tiny", "-o", str(tmp_path / "p"), "--retrieval-op", "plugin", "--no-validate"]) == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["retrieval_op"] == "plugin"
    for extra, what in ((["--int4"], "quantizer runs on standard-op graphs"),):
        p = subprocess.run([sys.executable, "-m", "mplus_deploy.cli.export", "tiny", "-o", str(tmp_path / "q"),
                            "--retrieval-op", "plugin", *extra], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and what in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "q").exists()


@pytest.mark.skipif(not P.rtx_available(), reason="tensorrt_rtx not installed")
def test_rtx_parses_plugin_graph_up_to_the_plugins(pair):
    """TensorRT-RTX's parser (no tensorrt.plugin, so our plugins cannot be registered in it) takes the standard
    prefill graph whole and stops on the plugin graph only at the mplus plugin lookup (in a subprocess: a failing
    plugin lookup must not take the test process down)."""
    _, std, plug = pair
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from mplus_deploy.export.trt_check import parse_and_build
        fs = ({str(std / 'graphs' / 'prefill.onnx')!r}, {str(plug / 'graphs' / 'prefill.onnx')!r})
        print(json.dumps([parse_and_build(Path(f), {{}}, build=False)["errors"] for f in fs]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    std_errors, plug_errors = json.loads(p.stdout.strip().splitlines()[-1])
    assert std_errors == []
    assert plug_errors and all("Plugin not found" in e for e in plug_errors), plug_errors
    assert any("TopKRetrieve" in e for e in plug_errors), plug_errors
