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
                       ("int4", {"calib_method": "rtn_asym", "merge_lora": True})):
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
    assert schemes.given({})["name"] == "modelopt-default"


def test_cli_default_int4_records_scheme_and_gates_on_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(Q.TOP1_TARGET, "int4", 1.01)  # unreachable: the gate must fire
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny", "-o", str(out), "--int4"]) == 1
    err = capsys.readouterr().err
    assert "int4: scheme rtn_asym+merge-lora (default rule" in err and "missed the report's top-1 target" in err
    sec = json.loads((out / "manifest.json").read_text())["quantized"]["int4"]
    assert sec["scheme"]["name"] == "rtn_asym+merge-lora" and sec["options"]["merge_lora"] is True
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
