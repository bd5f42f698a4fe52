"""Calibration data and post-training quantization of exported artifacts (issue 7, docs/quantization.md).

Entry point for ``mplus-export --fp8|--int8|--int4 --calib FILE|builtin``::

    from mplus_deploy.calibration import quantize_artifact
    report = quantize_artifact(OUT, mode="fp8", calib="builtin")
"""
from .data import BUILTIN, CalibrationError, heldout_texts, load_texts
from .quantize import MODES, TOP1_TARGET, QuantOptions, quantize_artifact, select_nodes

__all__ = ["BUILTIN", "CalibrationError", "MODES", "QuantOptions", "TOP1_TARGET", "heldout_texts", "load_texts",
           "quantize_artifact", "select_nodes"]
