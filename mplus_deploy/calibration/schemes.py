"""Which quantization scheme a mode gets when the user names none (issue: `--fp8` meets its target by default).

The rule (docs/quantization.md "Default schemes"): a user who passes any scheme option
(``--calib-method``, ``--quant-weight-only``, ``--gptq``, ``--quant-auto-exclude``, ``--smooth-alpha``,
``--merge-lora``, ``--quant-exclude``) gets exactly what they asked for. Otherwise each mode gets the
scheme that met its report target on the demo (measured, docs/quantization.md), not ModelOpt's plain default:

- fp8, int8: weight-only (W8A16: ModelOpt's per-channel weights, its per-tensor static activation Q/DQ
  removed) with GPTQ rounding. Per-tensor static activations cost most of the accuracy (fp8 W8A8 top-1
  0.889, int8 0.739 on the demo; weight-only + GPTQ 0.953 and 0.985).
- int4: data-free asymmetric 4-bit blocks (``rtn_asym``, llama.cpp's Q4_1 grid) with the LoRA branch kept in
  fp32 beside them (0.986 on the demo's trained parts; folding the branch into the 4-bit weights, ``merge_lora``,
  0.888: the trained low-rank delta is finer than the grid; ModelOpt's symmetric ``rtn_dq`` 0.70), the lm_head in
  8-bit blocks (llama.cpp's Q8_0, ``q8_blocks.py``): top-1 unchanged, a quarter of the fp32 head's bytes per token.
  ``--merge-lora`` stays the faster decode (every projection one 4-bit GEMV, llama.cpp's layout) below target.
  ``quantize_lm_head`` / ``lm_head_bits`` given by the caller replace the default's (``OVERRIDES``).

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
    "int4": Scheme("rtn_asym+lm_head-q8",
                   {"calib_method": "rtn_asym", "quantize_lm_head": True, "lm_head_bits": 8},
                   "default for --int4: asymmetric 4-bit blocks (Q4_1 grid, data-free) with the LoRA branch kept in fp32, "
                   "the lm_head in 8-bit blocks (Q8_0 grid, as llama.cpp stores a Q4_1 model's output matrix); on the "
                   "demo with its shipped trained parts top-1 0.986 (target 0.90, 24 held-out texts) where folding the "
                   "LoRA into the 4-bit weights (--merge-lora, the faster decode) reached 0.888 and ModelOpt's "
                   "symmetric rtn_dq 0.70; the Q8_0 lm_head reads 1.1 instead of 4 bytes a weight"),
}
# Options that do not make a scheme of their own (a user who passes only these still gets the mode's default
# scheme) but that, when given, replace the default scheme's value: the lm_head's precision.
OVERRIDES = ("quantize_lm_head", "lm_head_bits")


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
    merged = {**opts, **s.options, **{k: opts[k] for k in OVERRIDES if k in opts}}
    return merged, {"name": s.name, "chosen_by": "default rule (calibration/schemes.py)",
                                   "options": _jsonable(s.options), "reason": s.reason}


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
