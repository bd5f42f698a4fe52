"""Export memory, cheaply (issue 13): from a checkpoint directory the exporter reads weights tensor by tensor
and never loads the model to export; only validation loads it (once), and the reference model is released,
really freed, before any onnxruntime session exists."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from mplus_deploy import build as exporter
from mplus_deploy.export import weights as W
from mplus_deploy.model import checkpoint


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, tiny_model):
    return checkpoint.save(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny-bf16", dtype=torch.bfloat16)


@pytest.fixture()
def spies(monkeypatch):
    """Counts ``checkpoint.load`` calls (through ``export.weights`` and the module) and ``src.get`` reads."""
    calls = {"load": [], "models": [], "sessions": []}
    real_load = checkpoint.load

    def load(path, dtype=torch.float32, *a, **k):
        m = real_load(path, dtype, *a, **k)
        calls["load"].append((str(path), dtype))
        calls["models"].append(weakref.ref(m))
        return m

    monkeypatch.setattr(W, "load", load)
    monkeypatch.setattr(checkpoint, "load", load)
    return calls


def _export(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return exporter.export_artifact(src, out, **kw)


def test_export_without_validation_never_loads_the_model(bf16_ckpt, tmp_path, spies):
    src = W.CheckpointWeights(bf16_ckpt)
    assert src.dtype == torch.bfloat16
    gets = []
    orig = src.get
    src.get = lambda name, dtype=None: gets.append(name) or orig(name, dtype)
    report = _export(src, tmp_path / "art", precision="auto", validate=False)
    assert spies["load"] == []
    assert src._ref is None
    assert report.precision == "bf16"  # auto: the checkpoint's dtype
    assert all(g.validation is None for g in report.graphs)
    # every checkpoint weight was read, tensor by tensor, and each at most a few times (plain, transposed,
    # stacked for the retriever), not once per graph that uses it
    meta_names = {n for n, _ in checkpoint.build_meta(src.cfg).named_parameters()
                  if ".encoder_query_proj." not in n}  # the encoder-side retriever query: no graph uses it
    assert set(gets) == meta_names
    assert max(gets.count(n) for n in set(gets)) <= 2, sorted((gets.count(n), n) for n in set(gets))[-3:]


def test_validation_loads_once_and_releases_the_reference_before_ort(bf16_ckpt, tmp_path, spies, monkeypatch):
    """The reference model is loaded once for the cases and freed before the runtime's runners (build.validate)
    load any graph; bf16 storage keeps ORT from folding the weight Casts into fp32 copies."""
    import onnxruntime as ort

    from mplus_deploy.build import validate as V

    src = W.CheckpointWeights(bf16_ckpt)
    real_runner, real_session = V.OrtRunner, ort.InferenceSession

    class Spy(real_runner):
        def activate_impl(self):
            gc.collect()
            spies["sessions"].append({"graphs": list(self._names), "ref": src._ref, "loads": len(spies["load"]),
                                      "alive": [r() is not None for r in spies["models"]]})
            return super().activate_impl()

    def session(model, so=None, providers=None, disabled_optimizers=None, **kw):
        spies["sessions"][-1]["folding"] = "ConstantFolding" not in (disabled_optimizers or [])
        return real_session(model, so, providers=providers, disabled_optimizers=disabled_optimizers, **kw)

    monkeypatch.setattr(V, "OrtRunner", Spy)
    monkeypatch.setattr(ort, "InferenceSession", session)
    report = _export(src, tmp_path / "art", precision="auto")
    assert spies["load"] == [(str(bf16_ckpt), torch.bfloat16)]  # the reference: bf16 weights, fp32 math
    assert len(spies["sessions"]) == len(report.graphs) >= 5
    for s in spies["sessions"]:
        assert s["ref"] is None, s["graphs"]
        assert s["alive"] == [False], s["graphs"]  # freed, not merely dropped by the source
        assert s["loads"] == 1
        assert s["folding"] is False  # bf16 storage: ORT must not fold the weight Casts into fp32 copies
    assert src._ref is None
    for g in report.graphs:
        v = g.validation
        assert v is not None and v.cases >= 1, g.name
        for o in v.outputs.values():
            assert o.mismatches == 0 and o.max_abs <= 1e-5 * max(1.0, o.scale), (g.name, o.name, o.max_abs)


def test_the_validation_reference_is_bf16_storage_fp32_math(bf16_ckpt):
    src = W.CheckpointWeights(bf16_ckpt)
    ref = src.reference(torch.bfloat16)
    assert ref.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
    assert src.reference(torch.bfloat16) is ref  # loaded once
    src.release()
    assert src._ref is None
