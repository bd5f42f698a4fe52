"""Which quantization scheme a mode gets when the user names none (issue: `--fp8` meets its target by default).

The rule (docs/quantization.md "Default schemes"): a user who passes any scheme option
(``--calib-method``, ``--quant-weight-only``, ``--gptq``, ``--quant-auto-exclude``, ``--smooth-alpha``,
``--merge-lora``, ``--quant-exclude``) gets exactly what they asked for. Otherwise each mode gets the
scheme that met its report target on the demo (measured, docs/quantization.md), not ModelOpt's plain default:

- fp8, int8: weight-only (W8A16: ModelOpt's per-channel weights, its per-tensor static activation Q/DQ
  removed) with GPTQ rounding. Per-tensor static activations cost most of the accuracy (fp8 W8A8 top-1
  0.889, int8 0.739 on the demo; weight-only + GPTQ 0.953 and 0.985).
- int4: data-free asymmetric 4-bit blocks (``rtn_asym``, llama.cpp's Q4_1 grid) with the LoRA branch
  folded into the quantized weight (0.973; ModelOpt's symmetric ``rtn_dq`` 0.70).

The chosen scheme, who chose it and why go into the manifest (``quantized.<mode>.scheme``) and on stderr.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEME_OPTIONS = ("calib_method", "weight_only", "gptq", "auto_exclude", "smooth_alpha", "merge_lora", "exclude")


@dataclass(frozen=True)
class Scheme:
    name: str
    options: dict = field(default_factory=dict)
    reason: str = ""


DEFAULTS = {
    "fp8": Scheme("weight-only+gptq", {"weight_only": True, "gptq": True},
                  "default for --fp8: FP8 E4M3 per-channel weights with GPTQ rounding, fp32 activations; on the demo "
                  "top-1 0.9505 (target 0.95; runtime-measured report) where W8A8 with per-tensor activations reached 0.889"),
    "int8": Scheme("weight-only+gptq", {"weight_only": True, "gptq": True},
                   "default for --int8: INT8 per-channel weights with GPTQ rounding, fp32 activations; on the demo "
                   "top-1 0.986 (target 0.97) where W8A8 reached 0.739"),
    "int4": Scheme("rtn_asym+merge-lora", {"calib_method": "rtn_asym", "merge_lora": True},
                   "default for --int4: asymmetric 4-bit blocks (Q4_1 grid, data-free) with LoRA folded in; on the "
                   "demo top-1 0.968 (target 0.90) where ModelOpt's symmetric rtn_dq reached 0.70"),
}


def user_chose(opts: dict) -> bool:
    """True when ``opts`` names any scheme option with a non-default value."""
    return any(opts.get(k) not in (None, False, (), []) for k in SCHEME_OPTIONS)


def given(opts: dict, by: str = "user") -> dict:
    """The ``scheme`` record of options used as given (``name``: the options, or ModelOpt's plain default)."""
    named = {k: opts[k] for k in SCHEME_OPTIONS if opts.get(k) not in (None, False, (), [])}
    name = "+".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in named.items()) or "modelopt-default"
    return {"name": name, "chosen_by": by, "options": _jsonable(named),
            "reason": "scheme options given by the caller are used exactly as given"}


def choose(mode: str, opts: dict, have_data: bool) -> tuple[dict, dict]:
    """(options to quantize with, the manifest's ``scheme`` record) for ``mode`` and the user's ``opts``."""
    if user_chose(opts):
        return dict(opts), given(opts)
    s = DEFAULTS[mode]
    if s.options.get("gptq") and not have_data:
        raise ValueError(f"the default {mode} scheme ({s.name}) needs calibration text for GPTQ: pass --calib FILE or "
                         "--calib builtin")
    return {**opts, **s.options}, {"name": s.name, "chosen_by": "default rule (calibration/schemes.py)",
                                   "options": _jsonable(s.options), "reason": s.reason}


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
