"""Issue 13 regression: a model whose weights exceed protobuf's 2 GiB limit exports (streamed, weights
in external data) and answers a query through onnxruntime equal to the torch reference.

Narrow but huge-vocab: tiny's layers with an 8.4M-token tied embedding (8.4M x 64 x 4 B = 2.15 GB > 2 GiB,
the size of a one-layer mplus-8b graph's embeddings). Timing and peak RSS at real width: bench/scale.py.
"""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model.checkpoint import save

VOCAB = 8_400_000
PROTO_LIMIT = 2**31


@pytest.fixture(scope="module")
def large_ckpt(tmp_path_factory):
    cfg = preset("tiny").replace(vocab_size=VOCAB, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("large") / "ckpt"
    model = MPlus.from_config(cfg, seed=0)
    assert model.model.embed_tokens.weight.numel() * 4 > PROTO_LIMIT
    save(model, d)
    del model
    return d


@pytest.fixture(scope="module")
def large_art(large_ckpt, tmp_path_factory):
    from mplus_deploy.cli.export import main

    out = tmp_path_factory.mktemp("large") / "art"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(large_ckpt), "-o", str(out)]) == 0
    return out


def test_graphs_stay_small_and_weights_go_to_external_data(large_art):
    data = large_art / "graphs" / "weights.data"
    assert data.stat().st_size > PROTO_LIMIT
    for f in (large_art / "graphs").glob("*.onnx"):
        assert f.stat().st_size < 16 << 20, f  # structure only: no weight is inline
        onnx.checker.check_model(str(f), full_check=True)
        m = onnx.load(str(f), load_external_data=False)
        big = [t.name for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1 << 20]
        assert not big, (f.name, big)


def test_every_graph_was_validated(large_art):
    from mplus_deploy.artifact import load_manifest

    man = load_manifest(large_art)
    for name, g in man["graphs"].items():
        v = g["validation"]
        assert v["cases"] >= 1, name
        assert max(v["max_abs"].values()) < 1e-3, (name, v["max_abs"])


def test_query_through_onnxruntime_equals_the_torch_reference(large_ckpt, large_art):
    from mplus_deploy import runtime

    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3))
    ort_eng = runtime.Engine(large_art, seed=0)
    got = ort_eng.generate_ids(ids, max_new_tokens=4)
    ort_eng.close()
    ref = runtime.Engine(large_ckpt, backend="torch", seed=0).generate_ids(ids, max_new_tokens=4)
    assert got.tolist() == ref.tolist()
