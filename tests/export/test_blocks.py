"""Blocked temporaries of long prompts at paper scale: retrieval scores in column blocks
(``retriever.score_chunks``: the [T, S] score matrix is never alive whole) and attention in query-row blocks
(``common.attn_blocks``). Blocks are cut in-graph from the dynamic sizes, so one graph serves every size;
retrieved indices must equal the unchunked reference exactly, and everything else within fp32 tolerance."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

from mplus_deploy.export import common, retriever
from mplus_deploy.export.common import Limits
from tests.ort_helpers import ort_session
from mplus_deploy.model import preset


@pytest.mark.parametrize("S", [7, 8, 9, 31, 100, 1000])
@pytest.mark.parametrize("chunks", [2, 5, 16])
def test_chunked_scores_equal_unchunked(S, chunks):
    g = torch.Generator().manual_seed(S * 31 + chunks)
    q, keys = torch.randn(13, 8, generator=g), torch.randn(S, 8, generator=g)
    want = retriever.mean_sigmoid(q, keys, 1)
    got = retriever.mean_sigmoid(q, keys, chunks)
    assert got.shape == (S,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("Q,R", [(1, 9), (5, 5), (7, 30), (13, 40)])
@pytest.mark.parametrize("blocks", [2, 3, 8])
def test_attention_blocks_equal_unblocked(Q, R, blocks):
    g = torch.Generator().manual_seed(Q * 100 + R + blocks)
    q, k, v = torch.randn(4, Q, 8, generator=g), torch.randn(2, R, 8, generator=g), torch.randn(2, R, 8, generator=g)
    want = common.attend(q, k, v, 2)
    got = common.attend(q, k, v, 2, blocks)
    assert got.shape == (Q, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 4])
def test_scores_equal_the_official_form(chunks):
    """The exported form ``mean(sigmoid(keys @ q^T), 1)`` is the official ``sigmoid(q @ keys^T).mean(0)``
    (spec §6.2) up to fp32 summation order."""
    g = torch.Generator().manual_seed(7 + chunks)
    q, keys = torch.randn(64, 16, generator=g), torch.randn(5000, 16, generator=g) * 0.5
    want = torch.sigmoid(q.double() @ keys.double().T).mean(0)
    got = retriever.mean_sigmoid(q, keys, chunks)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    official = torch.sigmoid(q @ keys.T).mean(0)
    assert (got - official).abs().max() < 1e-6


def test_chunk_rule():
    cfg = preset("tiny")
    assert retriever.score_chunks(cfg) == 1  # small graphs stay as they were
    mid = cfg.replace(ltm_initial_size=16384)  # issue 16's LTM: blocks for the cache, not for memory
    assert retriever.score_chunks(mid) == retriever.CACHE_CHUNKS
    big = preset("mplus-8b")
    lim = Limits.from_config(big)
    n = retriever.score_chunks(big, lim)
    full = 4 * lim.max_prompt * lim.max_ltm
    assert 1 < n <= retriever.MAX_SCORE_CHUNKS and full / n <= max(retriever.SCORE_BLOCK_BYTES, full / retriever.MAX_SCORE_CHUNKS)
    assert common.attn_blocks(2, 64, 512) == 1  # the demo's and tiny's graphs are unblocked
    assert common.attn_blocks(4, 2048, 12801 + 2048) == 4  # mplus-8b: 486 MB per KV head -> 4 blocks


@pytest.fixture(scope="module")
def chunked_art(tmp_path_factory):
    """tiny exported (and validated) with scores forced into 16 column blocks and attention into 8 row blocks."""
    from mplus_deploy.cli.export import main

    mp = pytest.MonkeyPatch()
    mp.setattr(retriever, "SCORE_BLOCK_BYTES", 64)
    mp.setattr(common, "ATTN_BLOCK_BYTES", 64)
    out = tmp_path_factory.mktemp("chunked") / "tiny"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["tiny", "-o", str(out)]) == 0  # validation compares prefill/retriever to the reference
    finally:
        mp.undo()
    return out


def _count(art, graph: str, op: str) -> int:
    m = onnx.load(str(art / "graphs" / f"{graph}.onnx"), load_external_data=False)
    return sum(n.op_type == op for n in m.graph.node)


def _sigmoids(art, graph: str) -> int:
    return _count(art, graph, "Sigmoid")


def test_graphs_chunked_and_exact_at_any_S(chunked_art, tiny_art, tiny_model):
    L, extra = tiny_model.config.num_hidden_layers, retriever.MAX_SCORE_CHUNKS - 1  # one score Sigmoid -> 16
    assert _sigmoids(chunked_art, "retriever") == _sigmoids(tiny_art[0], "retriever") + extra
    assert _sigmoids(chunked_art, "prefill") == _sigmoids(tiny_art[0], "prefill") + extra * L
    assert _count(chunked_art, "prefill", "Softmax") == _count(tiny_art[0], "prefill", "Softmax") * common.MAX_ATTN_BLOCKS
    sess = ort_session(chunked_art / "graphs" / "retriever.onnx")
    cfg = tiny_model.config
    g = torch.Generator().manual_seed(5)
    for S_m, n_p, pad in [(cfg.K0 + 1, 3, 0), (cfg.K0 + 37, cfg.K, 5), (3 * cfg.K0 + 11, 0, 2)]:
        f = retriever.sample(cfg, g, (7, S_m, n_p, pad, L - 1), torch.float32)
        got = sess.run(["indices"], {k: v.numpy() for k, v in f.items()})[0]
        want = retriever.reference(tiny_model, f)["indices"].numpy()
        assert np.array_equal(got, want), (S_m, n_p, pad)
