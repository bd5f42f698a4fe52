"""The torch backend on an artifact's quantized weights (``runtime/backends/torch_quant.py``) against the artifact's
own ORT quantized graphs: same feeds, every quantized graph, and the engine's greedy tokens."""
import shutil
import warnings

import numpy as np
import pytest
import torch

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends import torch_quant as TQ

from ..conftest import FAST


def _engines(art, mode, **kw):
    return (Engine(art, backend="onnxruntime", quantized=mode, seed=3, **kw),
            Engine(art, backend="torch", quantized=mode, seed=3, **kw))


def _close(a, b, rel=1e-5):
    scale = float(a.abs().max())
    assert float((a.float() - b.float()).abs().max()) <= rel * max(scale, 1.0), (a.abs().max(), (a - b).abs().max())


def _compare(art, mode):
    ort, tq = _engines(art, mode)
    assert tq.describe()["quantized"] == mode and tq.describe()["quantized_weights"] > 0
    g = torch.Generator().manual_seed(1)
    cfg = ort.config
    rows = torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)
    feeds = {"memory_project": {"rows": rows},
             "memory_update": {"ids": torch.randint(3, 250, (20,), generator=g),
                               "mem_tail": torch.randn(cfg.num_hidden_layers, cfg.K, cfg.hidden_size, generator=g)}}
    for graph, f in feeds.items():
        a, b = ort.runner.infer(graph, f), tq.runner.infer(graph, f)
        for k in a:
            _close(a[k], b[k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in (ort, tq):
            for _ in range(3):  # a merge (update_ltm_frequency 3): pending and merged LTM rows
                e.memorize(torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(5)), progress=False)
    torch.testing.assert_close(tq.host_memory.state.stm, ort.host_memory.state.stm, rtol=1e-5, atol=1e-5)
    p = torch.randint(3, 250, (12,), generator=g)
    f = {"ids": p, **ort.host_memory.prefill_feeds(), "logit_rows": torch.arange(12)}
    a, b = ort.runner.infer("prefill", f), tq.runner.infer("prefill", f)
    assert torch.equal(a["retrieved"], b["retrieved"])
    for k in ("logits", "present_k", "present_v"):
        _close(a[k], b[k])
    assert torch.equal(ort.generate_ids(p, max_new_tokens=16, stop_at_eos=False),
                       tq.generate_ids(p, max_new_tokens=16, stop_at_eos=False))


def test_fp8_weights_match_the_fp8_graphs(fp8_art):
    _compare(fp8_art[0], "fp8")


def test_int4_rtn_dq_weights_match_the_int4_graphs(int4_art):
    _compare(int4_art[0], "int4")


def test_int4_rtn_asym_merged_lora_matches_matmulnbits(fp8_art, tmp_path):
    """``rtn_asym`` + merged LoRA (the ``--int4`` default scheme): MatMulNBits + block offset read back as tinygemm
    weights. accuracy_level 1 (fp32 compute) so ORT computes the same arithmetic (level 4 quantizes activations)."""
    from mplus_deploy.calibration import quantize_artifact

    art = tmp_path / "asym"
    shutil.copytree(fp8_art[0], art)
    quantize_artifact(art, "int4", None, progress=False, print_table=False, calib_method="rtn_asym", merge_lora=True,
                      int4_accuracy_level=1, graphs=("memory_update", "memory_update_short", "memory_project", "prefill",
                                                      "decode"), **FAST)
    specs = TQ.read_artifact(art, __import__("json").loads((art / "manifest.json").read_text()), "int4")
    assert specs["decode"] and not any(sp.lora for sp in specs["decode"].values())  # merged: no branch runs
    _compare(art, "int4")


def test_kernels_equal_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    N, K, B = 48, 128, 32
    q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
    s, z = torch.rand(K // B, N, generator=g) * 0.1, torch.randn(K // B, N, generator=g) * 0.1
    w = (q.float() - 8) * s.repeat_interleave(B, 0).T + z.repeat_interleave(B, 0).T
    x = torch.randn(5, K, generator=g)
    y = TQ.Int4Weight(q, s, z, B, torch.device("cpu"), torch.float32).matmul(x)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    w8 = (torch.randn(N, K, generator=g) * 3).to(torch.float8_e4m3fn)
    sw, sa = torch.rand(N, generator=g) + 0.5, 0.02
    xq = TQ.fake_quant_fp8(x, sa)
    torch.testing.assert_close(TQ.fp8_matmul(x, w8, sw, sa), xq @ (w8.float() * sw[:, None]).T, rtol=1e-5, atol=1e-5)
    assert not torch.equal(xq, x)  # the activation really is quantized
    big = torch.full((1, K), 1e6)  # saturates at 448 * s_a like QuantizeLinear(saturate=1), never NaN
    assert torch.equal(TQ.fake_quant_fp8(big, sa), torch.full((1, K), 448 * sa))


def test_array_reads_external_int4_and_fp8(fp8_art, int4_art):
    import onnx

    art = int4_art[0]
    m = onnx.load(str(art / "graphs" / "decode.int4.onnx"), load_external_data=False)
    init = next(i for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT4)
    full = onnx.load(str(art / "graphs" / "decode.int4.onnx"))
    want = onnx.numpy_helper.to_array(next(i for i in full.graph.initializer if i.name == init.name))
    np.testing.assert_array_equal(TQ._array(init, art), want.astype(np.int8))


def test_refusals(fp8_art, tiny_artifact):
    with pytest.raises(ValueError, match="int8 runs on backend='onnxruntime'"):
        Engine(fp8_art[0], backend="torch", quantized="int8")
    with pytest.raises(ValueError, match="has no fp8 graphs"):
        Engine(tiny_artifact, backend="torch", quantized="fp8")
    with pytest.raises(ValueError, match="reads the quantized weights of an exported artifact"):
        Engine("tiny", backend="torch", quantized="fp8")
    with pytest.raises(ValueError, match="takes the options"):
        Engine(tiny_artifact, backend="torch", share_weights=True)
