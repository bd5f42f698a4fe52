"""GPTQ on ModelOpt's grid: exact where it must be, better than RTN where it should be, and written into the graphs."""
import warnings

import numpy as np
import pytest
import torch


from mplus_deploy.calibration import gptq as G
from mplus_deploy.calibration import quantize_artifact
from mplus_deploy.calibration.data import encoder, load_texts
from mplus_deploy.calibration.sensitivity import fake_weight, targets
from mplus_deploy.model import MPlus, preset

from .conftest import FAST
from .test_sensitivity import _dequantized_weight


def _problem(seed=0, O=48, I=64, rows=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, I, generator=g)
    x[:, :4] *= 20.0  # outlier channels, as in real activations
    x = x @ (torch.eye(I) + 0.3 * torch.randn(I, I, generator=g))  # correlated channels
    w = torch.randn(O, I, generator=g) * 0.05
    return w, (x.double().t() @ x.double()) / rows


def _proxy(w, wq, h):
    d = (wq.double() - w.double())
    return float(torch.trace(d @ h @ d.t()))


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_gptq_values_on_grid_and_beats_rtn(mode):
    w, h = _problem()
    q, s = G.gptq(w, h, mode)
    assert torch.equal(s, G.grid_scales(w, mode))  # ModelOpt's scales, untouched
    if mode == "int8":
        assert torch.equal(q, q.round()) and q.min() >= -128 and q.max() <= 127
    elif mode == "int4":
        assert torch.equal(q, q.round()) and q.min() >= -8 and q.max() <= 7
    else:
        assert torch.equal(q, q.to(torch.float8_e4m3fn).float()) and q.abs().max() <= 448
    rtn = fake_weight(w, mode, block_size=32)
    assert _proxy(w, q * s, h) < 0.7 * _proxy(w, rtn, h), mode  # what GPTQ minimizes: ||X (W_q - W)^T||^2


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_gptq_with_identity_hessian_is_rtn(mode):
    w, _ = _problem(1)
    q, s = G.gptq(w, torch.eye(w.shape[1], dtype=torch.float64), mode, act_order=False)
    torch.testing.assert_close(q * s, fake_weight(w, mode, block_size=32), rtol=0, atol=0)


def test_dead_channels_and_bad_block():
    w, h = _problem(2)
    h[5, :] = 0
    h[:, 5] = 0
    q, s = G.gptq(w, h, "int8")
    assert torch.isfinite(q).all() and (q[:, 5] == 0).all()  # never-active input channel: weight dropped (as GPTQ)
    with pytest.raises(ValueError, match="block size 32 does not divide"):
        G.gptq(w[:, :40], h[:40, :40], "int4")


def test_hessians_cover_every_target_group():
    model = MPlus.from_config(preset("tiny"), seed=3)
    enc = encoder(None, model.config.vocab_size)
    H = G.collect_hessians(model, enc, load_texts("builtin", 2), max_tokens=40, prompt_len=24)
    L = model.config.num_hidden_layers
    assert set(H) == {f"layers.{i}.{g}" for i in range(L) for g in ("q_in", "kv_in", "o_in", "mlp_in", "down_in")}
    for k, h in H.items():
        # symmetric, and positive semi-definite up to the fp32 accumulation's rounding (~1e-7 relative)
        assert torch.equal(h, h.t()) and torch.linalg.eigvalsh(h).min() > -1e-6 * h.diagonal().max(), k
    W = G.gptq_weights(model, H, "int8")
    assert set(W) == set(targets(model))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gptq_written_into_graphs(tmp_path, mode):
    """The ONNX pass writes GPTQ's integers on ModelOpt's scales: the graph's dequantized weight equals the
    torch GPTQ weight computed from the same Hessians, and the scales equal the RTN run's."""
    from mplus_deploy.build import export_artifact

    model = MPlus.from_config(preset("tiny"), seed=0)
    out = tmp_path / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(model, out, validate=False, source={"preset": "tiny"})
    opts = dict(FAST, graphs=("decode",), calib_method="rtn_dq" if mode == "int4" else None)
    with pytest.raises(ValueError, match="torch reference"):
        quantize_artifact(out, mode, "builtin", progress=False, print_table=False, gptq=True, **opts)
    rep = quantize_artifact(out, mode, "builtin", model=model, progress=False, print_table=False, gptq=True, **opts)
    assert rep["gptq"]["hessians"] == 5 * model.config.num_hidden_layers
    assert rep["quantization"]["decode"]["gptq_weights"] == 7 * model.config.num_hidden_layers
    path = out / rep["quantization"]["decode"]["file"]
    enc = encoder(None, model.config.vocab_size)
    texts = load_texts("builtin", FAST["max_samples"])
    from mplus_deploy.artifact import load_manifest

    n = min(FAST["max_tokens"], 128)  # QuantOptions.sensitivity_tokens
    max_prompt = int(load_manifest(out)["limits"]["max_prompt"])
    H = G.collect_hessians(model, enc, texts, n, min(n, max(2, max_prompt - FAST["greedy_tokens"])))
    W = G.gptq_weights(model, H, mode)
    for node, key in (("/layers.0/q_proj/base_layer/MatMul", "layers.0.q_proj"),
                      ("/layers.1/mlp/down_proj/base_layer/MatMul", "layers.1.down_proj")):
        got = torch.from_numpy(_dequantized_weight(path, node).astype(np.float32)).T
        w = targets(model)[key].weight.data
        scale = float(w.abs().max())
        assert (got - W[key]).abs().max() <= 1e-5 * scale, (mode, node)
        assert not torch.equal(got, fake_weight(w, mode, block_size=32))  # not RTN
    md = (out / "report" / f"quantization.{mode}.md").read_text()
    assert "## GPTQ" in md


@pytest.mark.parametrize("mode", ["fp8", "int8", "int4"])
def test_batched_solve_equals_one_at_a_time(mode):
    """gptq.apply solves the weights of one shape together (one column loop for the batch): the values are
    exactly those of solving each weight alone, including a dead channel and its own Hessian per weight."""
    problems = [_problem(seed=s, O=40, I=64) for s in range(5)]
    ws, hs = [p[0] for p in problems], [p[1].clone() for p in problems]
    hs[2][7, :] = 0.0
    hs[2][:, 7] = 0.0
    one = [G.gptq(w, h, mode)[0] for w, h in zip(ws, hs)]
    S = torch.stack([G.grid_scales(w, mode).double() for w in ws])
    Q = G.solve(torch.stack(ws).double(), S, G.factorize(torch.stack(hs)), mode)
    for b in range(len(ws)):
        assert torch.equal(Q[b].float(), one[b]), b
