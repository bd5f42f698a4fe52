"""Default quantization schemes (``calibration/schemes.py``) and the CLI's target gate: with no scheme
option a mode gets its documented default, recorded in the manifest with the reason; any scheme option
is used exactly as given; a missed report target exits 1 unless --accept-below-target."""
from __future__ import annotations

import json
import warnings

import pytest

from mplus_deploy.calibration import quantize as Q
from mplus_deploy.calibration import schemes
from mplus_deploy.cli.export import main


def test_defaults_per_mode():
    for mode, want in (("fp8", {"weight_only": True, "gptq": True}), ("int8", {"weight_only": True, "gptq": True}),
                       ("int4", {"calib_method": "rtn_asym", "quantize_lm_head": True,
                                 "lm_head_bits": 8})):
        opts, rec = schemes.choose(mode, {"max_samples": 8}, have_data=True)
        assert opts == {"max_samples": 8, **want}
        assert rec["chosen_by"].startswith("default rule") and rec["options"] == want
        assert str(Q.TOP1_TARGET[mode]).rstrip("0") in rec["reason"]  # the reason cites the target it met


def test_user_scheme_is_used_exactly():
    opts, rec = schemes.choose("fp8", {"calib_method": "max"}, have_data=True)  # plain ModelOpt W8A8
    assert opts == {"calib_method": "max"} and rec["chosen_by"] == "user" and rec["name"] == "calib_method=max"
    opts, rec = schemes.choose("int8", {"gptq": True, "exclude": ("^/layers\\.0/",)}, have_data=True)
    assert opts == {"gptq": True, "exclude": ("^/layers\\.0/",)} and rec["options"]["exclude"] == ["^/layers\\.0/"]
    with pytest.raises(ValueError, match="needs calibration text"):
        schemes.choose("fp8", {}, have_data=False)


def test_an_explicit_lm_head_choice_replaces_the_default_schemes():
    """The lm_head options are not a scheme of their own: the int4 default stays, with the caller's lm_head."""
    opts, rec = schemes.choose("int4", {"lm_head_bits": 4}, have_data=False)
    assert rec["chosen_by"].startswith("default rule") and opts["lm_head_bits"] == 4 and "merge_lora" not in opts
    opts, _ = schemes.choose("int4", {"quantize_lm_head": False}, have_data=False)
    assert opts["quantize_lm_head"] is False and opts["lm_head_bits"] == 8
    assert schemes.given({})["name"] == "modelopt-default"


def test_cli_default_int4_records_scheme_and_gates_on_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(Q.TOP1_TARGET, "int4", 1.01)  # unreachable: the gate must fire
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny", "-o", str(out), "--int4"]) == 1
    err = capsys.readouterr().err
    assert "int4: scheme rtn_asym+lm_head-q8 (default rule" in err and "missed the report's top-1 target" in err
    sec = json.loads((out / "manifest.json").read_text())["quantized"]["int4"]
    assert sec["scheme"]["name"] == "rtn_asym+lm_head-q8" and sec["options"]["merge_lora"] is False
    assert sec["options"]["lm_head_bits"] == 8 and sec["options"]["quantize_lm_head"] is True
    import onnx

    dec = onnx.load(str(out / sec["graphs"]["decode"]["file"]), load_external_data=False)
    bits = sorted({a.i for n in dec.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"})
    assert bits == [4, 8]  # the projections on the 4-bit grid, the lm_head on the 8-bit one
    assert sec["options"]["calib_method"] == "rtn_asym" and sec["report"]["meets_target"] is False


def test_cli_accept_below_target(tmp_path, monkeypatch):
    seen = {}

    def fake(out, mode, calib, model, progress, scheme, **opts):
        seen.update(mode=mode, scheme=scheme, opts=opts)
        return {"meets_target": False, "end_to_end": {"top1_agreement": 0.5}, "target": {"top1_agreement": 0.9}}

    monkeypatch.setattr(Q, "quantize_artifact", fake)
    import mplus_deploy.calibration as C

    monkeypatch.setattr(C, "quantize_artifact", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny", "-o", str(tmp_path / "a"), "--int4", "--accept-below-target"]) == 0
        assert main(["tiny", "-o", str(tmp_path / "b"), "--int4"]) == 1
    assert seen["mode"] == "int4" and seen["opts"]["calib_method"] == "rtn_asym"
    assert main(["tiny", "-o", str(tmp_path / "c"), "--accept-below-target"]) == 2  # only with a mode


def test_cli_lm_head_bits_maps_to_the_int4_options_only():
    from types import SimpleNamespace

    from mplus_deploy.cli.export_staging import quant_options

    base = dict(calib_method=None, quantize_lm_head=False, calib_samples=None, exclude=[], auto_exclude=False,
                smooth_alpha=None, merge_lora=False, gptq=False, weight_only=False, auto_granularity="layer")
    for bits, want in ((8, {"quantize_lm_head": True, "lm_head_bits": 8}),
                       (4, {"quantize_lm_head": True, "lm_head_bits": 4}), (32, {"quantize_lm_head": False})):
        prec = SimpleNamespace(**base, lm_head_bits=bits)
        assert quant_options(prec, "int4") == want and quant_options(prec, "fp8") == {}
        opts, rec = schemes.choose("int4", quant_options(prec, "int4"), have_data=False)
        assert rec["chosen_by"].startswith("default rule") and opts["quantize_lm_head"] is want["quantize_lm_head"]
    assert quant_options(SimpleNamespace(**base, lm_head_bits=None), "int4") == {}
