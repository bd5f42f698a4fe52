"""Per-layer quantization sensitivity and mixed-precision planning on the torch reference (issue 7).

A fast *simulation* of the ModelOpt scheme (docs/quantization.md "Precision model") in torch, used to
decide which decoder layers to keep in high precision before the (slow) real ONNX quantization runs:

- ``fp8`` / ``int8``: per-output-channel weight scales and one static per-tensor scale per MatMul input,
  calibrated as ModelOpt's ``max`` does (the largest |x| seen on calibration text; the planner measures it
  on calibration texts disjoint from the ones it scores, so unseen activations clip as they do on held-out text). INT8: amax / 127.
  FP8: ModelOpt 0.47 calibrates as INT8 and converts the scale with ``scale * 448 / 127``
  (``modelopt/onnx/quantization/fp8.py: int8_to_fp8``), so amax lands on 127² / 448 ≈ 36, not on
  E4M3's 448: 3.6 binades of headroom above amax, and the same fewer below it before subnormals. We
  simulate what it writes (``FP8_AMAX_AT``; tests/calibration/test_sensitivity.py checks the weights
  bit for bit); on the demo the 448 mapping would be ~0.5 point better (docs/quantization.md);
- ``int4``: weight-only, symmetric, block-wise along K (``block_size``), as ModelOpt's ``rtn_dq``.

Targets are the weight MatMuls the exporter quantizes (q/k/v/o, gate/up/down of every layer; not the
LoRA branches, retriever projectors or lm_head). The simulation quantizes the memory-update path too,
because the same modules serve it.

:func:`Simulator.top1` measures top-1 agreement of any configuration (which modules, RTN or GPTQ weights,
with or without activation quantization); ``mixed.py`` plans mixed precision with it: it keeps the most sensitive layers in fp32 (fewest layers, found by bisection over
the sensitivity ranking) until the simulated top-1 agreement reaches ``target + margin``. It runs on the
*calibration* texts, never on the held-out report texts (no selection bias in the report).

Measured on the demo (docs/quantization.md): the simulation tracks the real ORT numbers within ~2-3 points.
"""
from __future__ import annotations

import contextlib

import torch

from mplus_deploy.model.layers import LoRALinear

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0
FP8_AMAX_AT = 127.0 * 127.0 / 448.0  # where ModelOpt 0.47's int8_to_fp8 puts amax (see module docstring)


def targets(model) -> dict[str, torch.nn.Linear]:
    """``layers.{i}.{name}`` → the base ``nn.Linear`` the exporter quantizes."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        mods = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
                "o_proj": layer.self_attn.o_proj, "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj,
                "down_proj": layer.mlp.down_proj}
        for name in TARGET_NAMES:
            m = mods[name]
            out[f"layers.{i}.{name}"] = m.base_layer if isinstance(m, LoRALinear) else m
    return out


def fake_fp8(x: torch.Tensor, amax) -> torch.Tensor:
    s = amax / FP8_AMAX_AT
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * s


def fake_int8(x: torch.Tensor, amax) -> torch.Tensor:
    s = amax / 127.0
    return torch.round(x / s).clamp(-128, 127) * s


def fake_weight(w: torch.Tensor, mode: str, block_size: int = 32) -> torch.Tensor:
    """Quantize-dequantize a [out, in] weight as ModelOpt stores it."""
    if mode == "int4":
        O, I = w.shape
        if I % block_size:
            raise ValueError(f"int4 block size {block_size} does not divide the input size {I}")
        wb = w.reshape(O, I // block_size, block_size)
        s = wb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7.0
        return (torch.round(wb / s).clamp(-8, 7) * s).reshape(O, I)
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if mode == "fp8":
        return fake_fp8(w, amax)
    if mode == "int8":
        return fake_int8(w, amax)
    raise ValueError(f"mode must be fp8, int8 or int4, got {mode!r}")


def _run_texts(model, init, enc, texts, max_tokens: int, prompt_len: int, fn):
    """Per text, from ``init``: memorize its first ``max_tokens`` tokens, prefill the first ``prompt_len``."""
    with torch.no_grad():
        for t in texts:
            ids = enc(t)[:max_tokens]
            if ids.numel() < 2:
                continue
            model.memory = init.clone()
            model.inject(ids)
            fn(model.prefill_logits(ids[: max(2, prompt_len)]))


def observe(model, enc, texts, max_tokens: int, prompt_len: int, hooks: dict, progress: str | None = None) -> None:
    """Run ``texts`` (:func:`_run_texts`: memorize, prefill) with forward pre-hooks ``{module name: fn(x)}`` on
    the target linears (``x`` = the linear's input); hooks removed and the memory restored afterwards."""
    handles = [lin.register_forward_pre_hook(lambda mod, args, fn=hooks[n]: fn(args[0].detach()))  # noqa: ARG005
               for n, lin in targets(model).items() if n in hooks]
    init = model.memory.clone()
    it = texts
    if progress:
        from tqdm import tqdm

        it = tqdm(texts, desc=progress, unit="text")
    try:
        _run_texts(model, init, enc, it, max_tokens, prompt_len, lambda _l: None)
    finally:
        for h in handles:
            h.remove()
        model.memory = init


def channel_amax(model, enc, texts, max_tokens: int = 128, prompt_len: int | None = None) -> dict[str, torch.Tensor]:
    """Per target module (``layers.{i}.{name}``): max |x| per input channel over calibration text."""
    amax: dict[str, torch.Tensor] = {}

    def hook(n):
        def fn(x):
            a = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[n] = torch.maximum(amax[n], a) if n in amax else a
        return fn
    observe(model, enc, texts, max_tokens, prompt_len or max_tokens, {n: hook(n) for n in targets(model)})
    return amax


@contextlib.contextmanager
def simulated(model, mode: str, amax: dict[str, float], layers=None, block_size: int = 32, scales=None, weights=None,
              activations: bool = True, names=None, modules=None):
    """Fake-quantize the targets of ``layers`` (all when None) in place; restored on exit.

    ``scales``: per-module input-channel scales ``s`` of the smoothing pass (smooth.py): the weight is
    quantized as ``W * s`` and the activation as ``x / s`` (``amax`` must then be that of ``x / s``).
    ``weights``: precomputed dequantized weights per module (e.g. ``gptq.gptq_weights``) used instead of
    round-to-nearest. ``activations=False``: weights only. ``names``: only the targets whose module name
    (``layers.{i}.{name}``) ends with one of these (e.g. ``("down_proj",)``). ``modules``: only these module
    names (``{"layers.3.down_proj", ...}``).
    """
    saved, hooks = {}, []
    act = {"fp8": fake_fp8, "int8": fake_int8}.get(mode) if activations else None
    try:
        for n, lin in targets(model).items():
            if layers is not None and int(n.split(".")[1]) not in layers:
                continue
            if names is not None and n.split(".")[2] not in names:
                continue
            if modules is not None and n not in modules:
                continue
            saved[n] = lin.weight.data
            s = scales.get(n) if scales else None
            if weights is not None and n in weights:
                lin.weight.data = weights[n].to(lin.weight.dtype)
            elif s is None:
                lin.weight.data = fake_weight(lin.weight.data, mode, block_size)
            else:
                lin.weight.data = fake_weight(lin.weight.data * s, mode, block_size) / s
            if act is not None:
                a = amax[n]
                if s is None:
                    hooks.append(lin.register_forward_pre_hook(lambda mod, args, a=a: (act(args[0], a),)))  # noqa: ARG005
                else:
                    hooks.append(lin.register_forward_pre_hook(
                        lambda mod, args, a=a, s=s: (act(args[0] / s, a) * s,)))  # noqa: ARG005
        yield model
    finally:
        for h in hooks:
            h.remove()
        for n, lin in targets(model).items():
            if n in saved:
                lin.weight.data = saved[n]


class Simulator:
    """Reference argmaxes on ``texts`` once; then top-1 agreement of any simulated configuration."""

    def __init__(self, model, enc, texts, mode: str, max_tokens: int = 256, prompt_len: int = 224, block_size: int = 32,
                 scales=None, calib_texts=None):
        """``texts``: scored. ``calib_texts``: where the static activation amax is measured (default: ``texts``;
        pass disjoint texts to see, as the held-out report does, activations the calibration never saw)."""
        self.model, self.enc, self.texts, self.mode = model, enc, list(texts), mode
        self.max_tokens, self.prompt_len, self.block_size = max_tokens, prompt_len, block_size
        self.scales = scales
        self.weights = None  # precomputed quantized weights used by top1 (gptq.gptq_weights), None = RTN
        self.activations = True  # False: weight-only (weight_only.py)
        self.init = model.memory.clone()
        self.amax: dict[str, float] = {}
        if mode != "int4":
            ch = channel_amax(model, enc, list(calib_texts) if calib_texts else self.texts, max_tokens, prompt_len)
            for n, a in ch.items():  # per-tensor amax of what is quantized: x, or x / s when smoothed
                s = scales.get(n) if scales else None
                self.amax[n] = float((a / s).max()) if s is not None else float(a.max())
        self.ref = self._argmax()
        self.positions = int(sum(r.numel() for r in self.ref))

    def _argmax(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        _run_texts(self.model, self.init, self.enc, self.texts, self.max_tokens, self.prompt_len,
                   lambda lg: out.append(lg.argmax(-1)))
        self.model.memory = self.init
        return out

    def top1(self, layers=None, weights=None, activations: bool | None = None, names=None, modules=None) -> float:
        """Simulated top-1 agreement with the targets of ``layers`` quantized (None = all); ``weights``
        (default: ``self.weights``, e.g. GPTQ's), ``activations``, ``names``, ``modules``: see :func:`simulated`."""
        weights = self.weights if weights is None else weights
        activations = self.activations if activations is None else activations
        with simulated(self.model, self.mode, self.amax, layers, self.block_size, self.scales, weights, activations,
                       names, modules):
            got = self._argmax()
        agree = sum(int((a == b).sum()) for a, b in zip(got, self.ref))
        return agree / max(1, self.positions)


def torch_reference(model, texts):
    """The torch model the simulation/smoothing needs: an ``MPlus``, or a source ``resolve`` accepts."""
    import os

    from .data import CalibrationError

    if isinstance(model, (str, os.PathLike)):
        from mplus_deploy.model.presets import resolve

        model = resolve(model)[0]
    if model is None:
        raise ValueError("auto_exclude / smooth_alpha work on the torch reference: pass model= (mplus-export "
                         "does), or give explicit exclude patterns and no smoothing")
    if not texts:
        raise CalibrationError("auto_exclude / smooth_alpha need calibration texts (--calib FILE or builtin)")
    return model
