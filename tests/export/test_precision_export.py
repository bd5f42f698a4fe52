"""``--precision bf16`` (bf16 weight storage, fp32 math and graph I/O) end to end: half the weight bytes,
validated at the fp32 tolerance, greedy tokens through onnxruntime equal the torch backend on the bf16
checkpoint; ``--precision auto`` (the CLI default) picks bf16 for a bf16 checkpoint, ``--precision fp32``
of it computes the same tokens."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch

import mplus_deploy.artifact as M

VALID_TOL = 1e-4  # validate.TOLERANCES["fp32"]: a bf16 artifact computes in fp32


def _tol(graph: str) -> float:
    """The fp32 tolerance of ``graph`` (decode_batch: x4, build/validate.py GRAPH_TOLERANCE_FACTOR)."""
    return VALID_TOL * (4.0 if graph == "decode_batch" else 1.0)
MAX_ABS = 1e-5  # what it actually reaches (x max(1, |ref|))


@pytest.fixture(scope="module")
def bf16_art(tmp_path_factory, tiny_model):
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("art") / "tiny-bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_artifact(tiny_model, out, precision="bf16", source={"preset": "tiny"})
    return out, report


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, tiny_model):
    from mplus_deploy.model import checkpoint

    d = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    checkpoint.save(tiny_model, d, dtype=torch.bfloat16)
    return d


def _cli(args) -> int:
    from mplus_deploy.cli.export import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(args)


@pytest.fixture(scope="module")
def ckpt_auto_art(tmp_path_factory, bf16_ckpt):
    out = tmp_path_factory.mktemp("art") / "ckpt-auto"
    assert _cli([str(bf16_ckpt), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt_fp32_art(tmp_path_factory, bf16_ckpt):
    out = tmp_path_factory.mktemp("art") / "ckpt-fp32"
    assert _cli([str(bf16_ckpt), "-o", str(out), "--precision", "fp32", "--no-validate"]) == 0
    return out


def _ids(n, seed, V=256):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


PROMPTS = [_ids(9, 21), _ids(17, 22)]
MEMO = _ids(40, 23)


_GREEDY: dict = {}


def _greedy(path, **kw) -> list[list[int]]:
    """Greedy tokens for each prompt, then the same after memorizing 40 random ids (cached per artifact)."""
    if isinstance(path, torch.nn.Module):
        return _run_greedy(path, **kw)
    key = (str(path), tuple(sorted(kw.items())))
    if key not in _GREEDY:
        _GREEDY[key] = _run_greedy(path, **kw)
    return _GREEDY[key]


def _run_greedy(path, **kw) -> list[list[int]]:
    from mplus_deploy import runtime

    e = runtime.Engine(path, seed=0, **kw)
    try:
        out = [e.generate_ids(p, max_new_tokens=12, stop_at_eos=False).tolist() for p in PROMPTS]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e.memorize(MEMO, progress=False)
        out += [e.generate_ids(p, max_new_tokens=12, stop_at_eos=False).tolist() for p in PROMPTS]
    finally:
        e.close()
    assert all(len(set(t)) > 1 for t in out), out  # not a constant continuation
    return out


def _float_io_dtypes(man) -> set[str]:
    return {io["dtype"] for g in man["graphs"].values() for io in g["inputs"] + g["outputs"]
            if io["dtype"] not in ("int64", "int32", "bool")}


def test_weights_are_half_the_fp32_artifact(bf16_art, tiny_art):
    (out, report), (fp32_out, fp32_report) = bf16_art, tiny_art
    b16 = (out / "graphs" / "weights.data").stat().st_size
    f32 = (fp32_out / "graphs" / "weights.data").stat().st_size
    assert b16 == report.weights_bytes and f32 == fp32_report.weights_bytes
    assert abs(b16 / f32 - 0.5) < 0.02, (b16, f32)
    assert abs(report.weights_ratio - 1.0) < 0.05  # one copy of the parameters, in bf16


def test_every_graph_validated_at_fp32_tolerance(bf16_art):
    out, report = bf16_art
    man = M.load_manifest(out)
    assert set(man["graphs"]) == {g.name for g in report.graphs}
    for g in report.graphs:
        v = g.validation
        assert v is not None and v.cases >= 1, g.name
        assert v.tol == _tol(g.name) and v.ok, g.name
        for o in v.outputs.values():
            assert o.mismatches == 0, (g.name, o.name)
            assert o.max_abs <= MAX_ABS * max(1.0, o.scale), (g.name, o.name, o.max_abs, o.scale)
        mv = man["graphs"][g.name]["validation"]
        assert mv["tolerance"] == _tol(g.name) and mv["cases"] == v.cases
        assert mv["max_abs"] == {o.name: o.max_abs for o in v.outputs.values()}
        if g.name != "retriever":  # (indices only) elsewhere real float values were compared
            assert max(o.scale for o in v.outputs.values()) > 1.0, g.name


def test_manifest_dtypes_and_graph_io(bf16_art):
    out, _ = bf16_art
    man = M.load_manifest(out)
    assert man["precision"] == "bf16"
    assert man["weights"]["dtype"] == "bfloat16" and man["weights"]["compute_dtype"] == "float32"
    assert _float_io_dtypes(man) == {"float32"}
    T = onnx.TensorProto
    for name, g in man["graphs"].items():
        assert g["precision"] == "bf16" and g["weights_dtype"] == "bfloat16", name
        m = onnx.load(str(out / g["file"]), load_external_data=False)
        io = {v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
        assert T.FLOAT in io and not io & {T.FLOAT16, T.BFLOAT16}, (name, io)  # fp32 graph I/O
        ext = [t for t in m.graph.initializer if t.data_location == T.EXTERNAL]
        assert ext and {t.data_type for t in ext} == {T.BFLOAT16}, name  # every weight stored bf16


def _rounded_weights(model):
    """``model`` with its weights rounded to bf16 (kept in fp32) and its memory untouched: what an artifact
    exported from the fp32 model at --precision bf16 holds (the memory ships in the fp32 I/O precision)."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    return m


def test_ort_greedy_tokens_equal_torch_on_the_rounded_weights(bf16_art, tiny_model):
    out, _ = bf16_art
    assert _greedy(out) == _greedy(_rounded_weights(tiny_model), backend="torch")


def test_ort_greedy_tokens_equal_torch_on_the_bf16_checkpoint(ckpt_auto_art, bf16_ckpt):
    """The artifact of the bf16 checkpoint (precision auto -> bf16) against the torch backend loading that
    checkpoint (fp32 math on the bf16 values): the same weights and the same (bf16-valued) memory."""
    assert _greedy(ckpt_auto_art) == _greedy(bf16_ckpt, backend="torch")


def test_cli_auto_picks_bf16_for_a_bf16_checkpoint(ckpt_auto_art, bf16_ckpt, bf16_art):
    man = M.load_manifest(ckpt_auto_art)
    assert man["precision"] == "bf16"
    assert man["weights"]["dtype"] == "bfloat16"
    assert _float_io_dtypes(man) == {"float32"}
    for name, g in man["graphs"].items():
        assert g["precision"] == "bf16", name
        v = g["validation"]
        assert v["cases"] >= 1 and v["tolerance"] == _tol(name), name
        assert max(v["max_abs"].values()) <= MAX_ABS * 10, (name, v["max_abs"])  # |ref| <= ~5 here
    # the same bf16 weights as exporting the fp32 model at --precision bf16: byte-identical weights.data
    assert (ckpt_auto_art / "graphs" / "weights.data").read_bytes() == (bf16_art[0] / "graphs" / "weights.data").read_bytes()


def test_cli_fp32_of_the_bf16_checkpoint_gives_the_same_tokens(ckpt_fp32_art, ckpt_auto_art):
    man = M.load_manifest(ckpt_fp32_art)
    assert man["weights"]["dtype"] == "float32"
    assert all(g["weights_dtype"] == "float32" and g["precision"] == "fp32" for g in man["graphs"].values())
    f32 = (ckpt_fp32_art / "graphs" / "weights.data").stat().st_size
    b16 = (ckpt_auto_art / "graphs" / "weights.data").stat().st_size
    assert abs(f32 / b16 - 2.0) < 0.05
    # the fp32 weights are the bf16 values widened: every stored fp32 weight has zero low 16 bits
    raw = np.frombuffer((ckpt_fp32_art / "graphs" / "weights.data").read_bytes(), dtype=np.uint32)
    assert raw.any() and not (raw & 0xFFFF).any()
    assert _greedy(ckpt_fp32_art) == _greedy(ckpt_auto_art)


def test_in_memory_bf16_model_exports_validated(tiny_model, bf16_art, tmp_path):
    """A bf16 ``MPlus`` (e.g. ``load(ckpt, dtype=torch.bfloat16)``) at precision auto: bf16 storage, and the
    validation reference computes in fp32 like the graphs (a bf16-math reference missed the 1e-4 tolerance
    by 100x: ModelWeights.reference returned the bf16 model itself)."""
    from mplus_deploy.build import export_artifact

    m = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_artifact(m, tmp_path / "art", precision="auto")
    assert report.precision == "bf16"
    for g in report.graphs:
        v = g.validation
        assert v is not None and v.cases >= 1, g.name
        for o in v.outputs.values():
            assert o.mismatches == 0 and o.max_abs <= MAX_ABS * max(1.0, o.scale), (g.name, o.name, o.max_abs)
    assert (tmp_path / "art" / "graphs" / "weights.data").read_bytes() == (bf16_art[0] / "graphs" / "weights.data").read_bytes()
    # the caller's model is left as it was (the reference is an upcast copy)
    assert m.compute_dtype is None and m.dtype == torch.bfloat16 and type(m.lm_head) is torch.nn.Linear


def test_upcast_model_source_reports_its_storage_dtype(tiny_model):
    from mplus_deploy.export.exporter import resolve_precision
    from mplus_deploy.export.weights import ModelWeights
    from mplus_deploy.model.precision import upcast_compute

    m = upcast_compute(copy.deepcopy(tiny_model).to(torch.bfloat16))
    src = ModelWeights(m)
    assert m.dtype == torch.float32 and src.dtype == torch.bfloat16
    assert resolve_precision("auto", src) == "bf16"  # not fp32: that would double the weight bytes
    assert src.reference(torch.bfloat16) is m  # already bf16 storage with fp32 math: no copy
    fp32 = ModelWeights(tiny_model)
    assert resolve_precision("auto", fp32) == "fp32" and fp32.reference(torch.float32) is tiny_model
    ref = fp32.reference(torch.bfloat16)
    assert ref is not tiny_model and ref.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())
