"""Artifact layout, manifest contract (docs/graphs.md), validation numbers, shared weights, node names."""
import json

import numpy as np
import onnx
import pytest
import torch

import mplus_deploy.artifact as M
from mplus_deploy.runtime import ArtifactError as RuntimeArtifactError
from tests.ort_helpers import ort_session

MPLUS_GRAPHS = {"memory_update", "memory_update_short", "memory_project", "retriever", "prefill", "decode", "decode_batch"}
IO = {  # docs/graphs.md
    "memory_update": (["ids", "mem_tail"], ["delta"]),
    "memory_update_short": (["ids", "mem_tail"], ["delta"]),
    "memory_project": (["rows"], ["keys", "k", "v"]),
    "retriever": (["layer", "h", "ltm_keys", "ltm_ages", "valid_len", "merged_len"], ["indices"]),
    # format v3: the LTM per layer (views of the runtime's stacked store), logits of the rows in logit_rows
    "prefill": (["ids", "logit_rows", "stm_k", "stm_v", "ltm_keys.0", "ltm_k.0", "ltm_v.0", "ltm_keys.1", "ltm_k.1",
                 "ltm_v.1", "ltm_ages", "valid_len", "merged_len"], ["logits", "present_k", "present_v", "retrieved"]),
    # format v2: per layer a read-only memory prefix and the tail (tiny: L = 2)
    "decode": (["ids", "pos", "prefix_k.0", "prefix_v.0", "past_k.0", "past_v.0", "prefix_k.1", "prefix_v.1", "past_k.1",
                "past_v.1"], ["logits", "present_k.0", "present_v.0", "present_k.1", "present_v.1"]),
    # format v4: B sequences, each over its own prefix and the valid rows [0, tail_len) of its tail; new rows out
    "decode_batch": (["ids", "tail_len", "prefix_k.0", "prefix_v.0", "past_k.0", "past_v.0", "prefix_k.1", "prefix_v.1",
                      "past_k.1", "past_v.1"], ["logits", "new_k.0", "new_v.0", "new_k.1", "new_v.1"]),
}


def test_layout_and_manifest(tiny_art, tiny_model):
    out, _ = tiny_art
    m = M.load_manifest(out)
    assert m["format_version"] == M.FORMAT_VERSION
    assert set(m["graphs"]) == MPLUS_GRAPHS
    assert m["config"] == tiny_model.config.to_dict()
    for k in ("torch", "onnx", "onnxruntime", "exporter"):
        assert m["versions"][k]
    assert (out / "graphs" / "weights.data").is_file()
    assert {"memory/initial.safetensors", "memory/initial.json", "graphs/weights.data"} <= set(m["files"])
    for name, g in m["graphs"].items():
        assert g["opset"] >= 21 and g["precision"] == "fp32"
        assert [i["name"] for i in g["inputs"]] == IO[name][0]
        assert [o["name"] for o in g["outputs"]] == IO[name][1]
        sess = ort_session(out / g["file"])
        assert [i.name for i in sess.get_inputs()] == IO[name][0]
        assert [o.name for o in sess.get_outputs()] == IO[name][1]
        for d in g["dynamic_dims"].values():
            assert 1 <= d["min"] <= d["opt"] <= d["max"]
        assert g["validation"]["cases"] >= 2
    assert m["memory"]["P"] == tiny_model.config.prefix_len
    assert m["graphs"]["prefill"]["outputs"][0]["dtype"] == "float32"
    assert m["graphs"]["retriever"]["outputs"][0]["dtype"] == "int64"


def test_decode_contract_shapes(tiny_art, tiny_model):
    out, _ = tiny_art
    cfg = tiny_model.config
    g = M.load_manifest(out)["graphs"]["decode"]
    Hkv, Dh, P = cfg.num_key_value_heads, cfg.dh, cfg.prefix_len
    shapes = {io["name"]: io["shape"] for io in g["inputs"] + g["outputs"]}
    assert shapes["prefix_k.1"] == shapes["prefix_v.0"] == [Hkv, P, Dh]
    assert shapes["past_k.1"] == shapes["past_v.0"] == [Hkv, "C", Dh]
    assert shapes["present_k.0"] == shapes["present_v.1"] == [Hkv, "C+1", Dh]
    assert g["dynamic_dims"]["C"] == {"min": 1, "opt": min(16, cfg.max_window - 1), "max": cfg.max_window - 1}
    assert g["prefix_len"] == P


def _consumers(model: onnx.ModelProto, name: str) -> list[str]:
    return [n.op_type for n in model.graph.node if name in n.input]


def test_decode_reads_the_prefix_in_place(tiny_art, tmp_path):
    """The memory prefix only feeds the attention products (in ORT too, after its graph optimizations); the
    tail is copied once, by the Concat that appends the new row. Weight MatMul names are the scope names
    quantization matches (``select_nodes``, ``--quant-exclude``)."""
    import onnxruntime as ort

    out, _ = tiny_art
    raw = onnx.load(str(out / "graphs" / "decode.onnx"), load_external_data=False)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "decode.opt.onnx")
    ort.InferenceSession(str(out / "graphs" / "decode.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    for l in range(2):
        for c in "kv":
            assert set(_consumers(opt, f"prefix_{c}.{l}")) <= {"MatMul", "FusedMatMul"}, _consumers(opt, f"prefix_{c}.{l}")
            assert _consumers(opt, f"past_{c}.{l}") == ["Concat"]
            cat = next(n for n in opt.graph.node if f"past_{c}.{l}" in n.input)
            assert list(cat.output) == [f"present_{c}.{l}"]
            assert set(_consumers(raw, f"prefix_{c}.{l}")) <= {"MatMul", "Transpose"}
    names = [n.name for n in raw.graph.node]
    assert len(set(names)) == len(names) and all(n.startswith("/") for n in names)
    for w in ("q_proj/base_layer/MatMul", "k_proj/base_layer/MatMul", "v_proj/base_layer/MatMul", "o_proj/MatMul",
              "mlp/gate_proj/base_layer/MatMul", "mlp/down_proj/base_layer/MatMul", "q_proj/lora_B.decoder_adapter/MatMul"):
        assert f"/layers.1/{w}" in names, w
    assert "/layers.0/Softmax" in names and "/lm_head/MatMul" in names


def test_validation_within_fp32_tolerance(tiny_art):
    _, report = tiny_art
    for g in report.graphs:
        v = g.validation
        assert v is not None and v.ok, v.failures()
        assert v.max_abs < 1e-5, (g.name, v.max_abs)
        ints = [o for o in v.outputs.values() if o.mismatches]
        assert not ints


def test_graphs_share_one_weights_file(tiny_art, tiny_model):
    out, report = tiny_art
    locs = {}
    for f in sorted((out / "graphs").glob("*.onnx")):
        model = onnx.load(str(f), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                assert ext["location"] == "weights.data"
                locs.setdefault(f.stem, {})[t.name] = (int(ext["offset"]), int(ext["length"]))
    # the same base weight (layer-0 q_proj) is one range of weights.data in every graph that uses it
    q = {g: v for g, d in locs.items() for n, v in d.items() if n == "model.layers.0.self_attn.q_proj.base_layer.weight.T"}
    assert {"memory_update", "prefill", "decode"} <= set(q) and len(set(q.values())) == 1, q
    assert report.weights_bytes <= 1.15 * report.param_bytes, (report.weights_bytes, report.param_bytes)


def test_node_names_are_scoped_and_deterministic(tiny_art):
    out, _ = tiny_art
    model = onnx.load(str(out / "graphs" / "prefill.onnx"), load_external_data=False)
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    assert all(n.startswith("/") for n in names)
    assert any(n.startswith("/layers.1/q_proj/base_layer/") for n in names)
    assert "/layers.0/retrieval/TopK" in names and "/layers.1/bos/k_proj/base_layer/MatMul" in names
    assert "/layers.0/q_proj/lora_B.decoder_adapter/MatMul" in names


def test_checker_full(tiny_art):
    out, _ = tiny_art
    for f in sorted((out / "graphs").glob("*.onnx")):
        onnx.checker.check_model(str(f), full_check=True)


def test_memory_state_roundtrip(tiny_art, tiny_model):
    out, _ = tiny_art
    mem = M.load_memory_state(out, tiny_model.config)
    ref = tiny_model.memory
    assert torch.equal(mem.stm, ref.stm) and torch.equal(mem.stm_ages, ref.stm_ages)
    for a, b in zip(mem.ltm + mem.ltm_keys + mem.ltm_ages, ref.ltm + ref.ltm_keys + ref.ltm_ages):
        assert torch.equal(a, b)
    info = json.loads((out / "memory" / "initial.json").read_text())
    assert info["ltm_age_dtype"] == ref.ltm_age_dtype


def test_tampered_artifact_raises(tiny_art, tmp_path):
    import shutil

    out, _ = tiny_art
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    M.load_manifest(dst)
    p = dst / "graphs" / "weights.data"
    b = bytearray(p.read_bytes())
    b[100] ^= 0xFF
    p.write_bytes(bytes(b))
    (dst / "memory" / "initial.json").unlink()
    with pytest.raises(RuntimeArtifactError) as e:
        M.load_manifest(dst)
    assert set(e.value.files) == {"graphs/weights.data", "memory/initial.json"}
    assert "graphs/weights.data" in str(e.value)
    M.load_manifest(dst, verify=False)  # hashes not checked on request
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RuntimeArtifactError, match="format_version"):
        M.load_manifest(dst, verify=False)


def test_format_v1_artifact_is_refused_with_the_fix(tiny_art, tmp_path):
    """An artifact of format 1 (decode over a stacked past_k/past_v cache) must fail at open time with the
    reason and the re-export command, not later with an ORT input-name error."""
    import shutil

    from mplus_deploy.runtime import Engine

    out, _ = tiny_art
    dst = tmp_path / "v1"
    shutil.copytree(out, dst)
    m = json.loads((dst / "manifest.json").read_text())
    assert m["format_version"] == 4 == M.FORMAT_VERSION
    why = {1: ("past_k/past_v", "prefix_k.{l}"), 2: ("ltm_keys/ltm_k/ltm_v [L", "logit_rows"),
           3: ("no decode_batch graph", "continuous batching")}
    for old, words in why.items():
        m["format_version"] = old
        (dst / "manifest.json").write_text(json.dumps(m))
        for load in (lambda: M.load_manifest(dst), lambda: Engine(dst)):
            with pytest.raises(RuntimeArtifactError) as e:
                load()
            msg = str(e.value)
            assert f"format_version {old} is not supported" in msg and "reads 4" in msg
            assert all(w in msg for w in words), msg
            assert f"mplus-export tiny -o {dst} --overwrite" in msg
            assert e.value.files == ["manifest.json"]


def test_retriever_tie_rule_and_cyclic(tiny_art, tiny_model):
    """Duplicate keys (score ties → lower index wins), tied ages (descending position), pads, cyclic fill."""
    from mplus_deploy.export import retriever

    out, _ = tiny_art
    cfg = tiny_model.config
    sess = ort_session(out / "graphs" / "retriever.onnx")
    g = torch.Generator().manual_seed(3)
    K0 = cfg.K0
    for S_m, n_p in ((K0 + 6, 5), (K0 - 3, 4), (1, 0), (K0, 0)):
        S = max(S_m + n_p, K0) + 2
        keys = torch.randn(S, cfg.selector_hidden_dim, generator=g)
        keys[1::2] = keys[0::2][: keys[1::2].shape[0]]  # pairs of identical keys
        ages = torch.randint(0, 4, (S,), generator=g)
        feeds = {"layer": torch.tensor(1), "h": torch.randn(3, cfg.hidden_size, generator=g), "ltm_keys": keys,
                 "ltm_ages": ages, "valid_len": torch.tensor(S_m + n_p), "merged_len": torch.tensor(S_m)}
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        want = retriever.reference(tiny_model, feeds)["indices"].numpy()
        np.testing.assert_array_equal(got, want)
