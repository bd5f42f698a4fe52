"""Post-training quantization of an exported artifact (issue 7; docs/quantization.md).

``quantize_artifact(OUT, mode="fp8"|"int8"|"int4", calib="builtin"|path|None, ...)``:

1. calibration texts (:mod:`.data`) → inputs of every graph captured through the fp32 host composition
   (:mod:`.capture`);
2. per graph, the weight MatMuls to quantize are chosen here (:func:`select_nodes`) and handed to
   NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``) as an explicit node list:
   FP8 E4M3 / INT8 = per-tensor activation scales (max or entropy calibration) + per-channel weight
   scales, weights stored quantized (``dq_only``); INT4 = weight-only block-wise (RTN by default,
   AWQ-clip/lite with calibration data on request) as ``DequantizeLinear(int4)`` → MatMul, which onnxruntime fuses into
   ``MatMulNBits`` from ``ORT_ENABLE_EXTENDED``;
3. each quantized graph is written as ``graphs/<name>.<mode>.onnx``; its initializers that are unchanged
   fp32 tensors point into the existing ``graphs/weights.data`` (no second copy of embeddings, norms,
   LoRA, lm_head...), new tensors (quantized weights, scales) go to one shared
   ``graphs/weights.<mode>.data``;
4. onnx.checker, onnxruntime CPU at ``ORT_ENABLE_BASIC`` (platform-notes §2.2), optional TensorRT-RTX
   parse, the accuracy report (:mod:`.report`), then ``manifest.json`` gains a ``quantized.<mode>``
   section and the sha256 of the new files (exporter helpers ``load_manifest``/``hash_files``).

Never quantized (platform-notes §2.6, §7): masks and any non-MatMul op (``op_types_to_quantize=["MatMul"]``),
activation x activation MatMuls (attention scores/probabilities, retrieval scores), the ``retriever``
graph; by default also ``lm_head``, the retriever projectors (``query_proj``/``key_proj``) and the
low-rank LoRA branches (flags ``quantize_lm_head``, ``quantize_retriever``, ``quantize_lora``).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from mplus_deploy.util.machine import release_memory

from .data import (
    BUILTIN,
    CalibrationError,
    encoder,
    load_artifact_tokenizer,
    load_texts,
)
from .mixed import matches
from mplus_deploy.artifact import update_quantized

from .steps import ort_session, trt_parse
from .graph_pass import GraphPass
from .weights import SharedWriter, fp32_weight_index

MODES = ("fp8", "int8", "int4")
_CAPTURE_CACHE: dict = {}
DEFAULT_GRAPHS = ("memory_update", "memory_update_short", "memory_project", "prefill", "decode")
NEVER_GRAPHS = ("retriever",)  # the standalone retrieval-score graph
TOP1_TARGET = {"fp8": 0.95, "int8": 0.97, "int4": 0.90}

PATTERNS = {
    "lm_head": re.compile(r"(^|/)lm_head/"),
    "retriever": re.compile(r"/(retrieval|query_proj|key_proj|encoder_query_proj)"),
    "lora": re.compile(r"/lora_[AB]\."),
}


@dataclass
class QuantOptions:
    calib_method: str | None = None  # fp8/int8: "max" (default) | "entropy"; int4: "rtn_dq" (default) | "awq_clip" | "awq_lite" | "rtn_asym"
    graphs: tuple = DEFAULT_GRAPHS
    quantize_lm_head: bool = False
    # rtn_asym only: the lm_head's grid when quantize_lm_head (4: asymmetric 4-bit blocks like every other MatMul;
    # 8: symmetric 8-bit blocks, llama.cpp's Q8_0, q8_blocks.py)
    lm_head_bits: int = 4
    quantize_retriever: bool = False  # query_proj / key_proj MLPs (never the score MatMul)
    quantize_lora: bool = False
    # mixed precision: node-name regexes kept in fp32 (e.g. r"^/layers\.2/"), and/or "auto" = plan the fewest
    # decoder layers to keep in fp32 from a torch simulation (sensitivity.py; needs the torch model)
    exclude: tuple = ()
    auto_exclude: bool = False
    auto_target: float | None = None  # top-1 the plan aims at; default TOP1_TARGET[mode]
    auto_granularity: str = "layer"  # "layer" | "unit" (qkv / o_proj / gate_up / down_proj of one layer; mixed.py)
    auto_margin: float = 0.03  # simulated top-1 must reach TOP1_TARGET + margin (the demo: sim on calibration text ran 2-3 points above held-out)
    sensitivity_texts: int = 8  # calibration texts the simulation scores on
    sensitivity_tokens: int = 128  # tokens per text memorized and prefilled by the simulation
    # per-input-channel scaling before quantization (smooth.py): SmoothQuant for fp8/int8, AWQ-style for
    # int4; None = off. Needs the torch model (activation statistics).
    smooth_alpha: float | None = None
    # GPTQ rounding on ModelOpt's grid (gptq.py): same scales and format, error-compensating integers;
    # needs the torch model (Hessians of the calibration activations)
    gptq: bool = False
    weight_only: bool = False  # fp8/int8: per-channel weights only, fp32 activations (W8A16 instead of W8A8)
    # how weight-only fp8/int8 graphs are written: "direct" (weight_dq.py: ModelOpt's numbers without running its
    # calibration; no capture) or "modelopt" (ModelOpt's W8A8 with its activation Q/DQ stripped, weight_only.py;
    # the cross-check: tests/calibration/test_weight_dq.py shows both write the same weights bit for bit)
    weight_only_via: str = "direct"
    merge_lora: bool = False  # fold each graph's LoRA branch into its base weight before quantizing (artifact/lora_merge.py)
    int4_accuracy_level: int = 4  # rtn_asym's MatMulNBits accuracy_level (4: int8 compute, fastest on CPU; 1: fp32)
    block_size: int = 32  # int4 block along K (576 = 18 x 32 for the demo; 128 does not divide it)
    max_samples: int = 64  # calibration texts
    max_tokens: int = 256  # tokens per calibration text
    n_decode: int = 8  # decode steps captured per text
    max_per_graph: int = 32  # captured samples kept per graph (reservoir)
    # weight-only fp8/int8: ModelOpt's activation ranges are computed and then removed (weight_only.py), so its
    # calibration only needs to run: capture this many texts (each graph exercised) instead of all of them
    weight_only_capture_texts: int = 4
    eval_texts: int = 24  # held-out texts for the report
    greedy_tokens: int = 32
    greedy_texts: int = 4  # held-out texts that also get the greedy-agreement run (decode is the report's slow part)
    # knowledge retention (evaluation.retention) at N = 0 and 10 distractor chunks, fp32 vs quantized, on this many
    # builtin facts; None: 12 when the artifact has a tokenizer (a text model), else off; 0: off
    retention_facts: int | None = None
    trt_parse: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)  # passed through to modelopt quantize()

    def method(self, mode: str, have_data: bool) -> str:
        if self.calib_method:
            return self.calib_method
        if mode == "int4":  # AWQ-clip is opt-in: ~6 s per MatMul on CPU (about 1.5 h for the demo's 5 graphs)
            return "rtn_dq"
        return "max"


# ------------------------------------------------------------------------------------ node selection
def select_nodes(model: onnx.ModelProto, opts: QuantOptions) -> tuple[list[str], dict[str, str]]:
    """→ (MatMul node names to quantize, {excluded node name: reason}) for one graph."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    sel, excl = [], {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        if not (n.input[1] in inits or n.input[1] in consts):
            excl[n.name] = "activation x activation (attention / retrieval scores)"
        elif PATTERNS["lm_head"].search(n.name) and not opts.quantize_lm_head:
            excl[n.name] = "lm_head (high precision by default)"
        elif PATTERNS["retriever"].search(n.name) and not opts.quantize_retriever:
            excl[n.name] = "retriever projector (high precision by default)"
        elif PATTERNS["lora"].search(n.name) and not opts.quantize_lora:
            excl[n.name] = "LoRA low-rank branch (high precision by default)"
        elif opts.exclude and matches(n.name, opts.exclude):
            excl[n.name] = "kept fp32 (mixed precision: exclude patterns)"
        else:
            sel.append(n.name)
    return sel, excl


def weight_params(model: onnx.ModelProto, names) -> int:
    """Elements of the weight initializers of these MatMul nodes (dims only; no external data needed)."""
    dims = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    want = set(names)
    return sum(dims.get(n.input[1], 0) for n in model.graph.node if n.name in want)


def quantized_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose weight input comes from a DequantizeLinear (i.e. really quantized), and the MatMuls
    ``asym_int4`` replaced by ``MatMulNBits`` (reported under their original names)."""
    from .asym_int4 import nbits_matmuls

    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in dq_out] + nbits_matmuls(model)


# ------------------------------------------------------------------------------------ entry point
class Handoff:
    """``quantize_artifact(model=Handoff(m))`` hands the torch model over: quantization takes it and frees it
    after its torch stage (Hessians, sensitivity), before the graphs and the accuracy report. A model passed
    as is stays alive for the whole call (the caller's argument dict holds it)."""

    def __init__(self, obj):
        self._obj = obj

    def take(self):
        obj, self._obj = self._obj, None
        return obj


def quantize_artifact(out, mode: str = "fp8", calib=BUILTIN, model=None, tokenizer=None, progress: bool = True,
                      report: bool = True, print_table: bool = True, verify: bool = True, scheme: dict | None = None,
                      log=None, **opts) -> dict:
    """Quantize the graphs of the exported artifact ``out`` in place (new files + manifest section).

    ``calib``: ``"builtin"`` | path to ``.txt``/``.jsonl`` | list of strings | ``None`` (refused for fp8/int8;
    int4 default RTN needs none). ``model``: optional torch reference (not needed: the fp32 graphs,
    validated against it at export, are the reference). ``tokenizer``: defaults to ``out/tokenizer``
    (byte fallback for presets without one). ``opts``: :class:`QuantOptions` fields, used as given; for the
    default scheme of a mode (what ``mplus-export --fp8`` uses) take them from ``schemes.choose`` and pass
    its record as ``scheme`` (written to the manifest section). ``log``: a callable taking one line per stage
    (what ``mplus-export`` prints on stderr, with RSS), independent of the ``progress`` bars.

    Returns the report dict (also written to ``out/report/quantization.{json,md}``). Raises
    :class:`CalibrationError` (bad/missing calibration data) or ``ValueError`` (bad mode/options).
    """
    from mplus_deploy.artifact import load_manifest
    from mplus_deploy.util.machine import stage_logger

    from . import capture as cap_mod

    say = stage_logger(log, f"{mode}: ")
    t_all = time.perf_counter()
    if isinstance(model, Handoff):
        model = model.take()
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    o = QuantOptions(**{k: v for k, v in opts.items() if k in QuantOptions.__dataclass_fields__})
    unknown = set(opts) - set(QuantOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown quantization options {sorted(unknown)}; known: {sorted(QuantOptions.__dataclass_fields__)}")
    out = Path(out)
    man = load_manifest(out, verify=verify)
    if man.get("precision") != "fp32":
        raise ValueError(f"quantization starts from an fp32 export; {out} is {man.get('precision')} "
                         "(re-export with --precision fp32)")
    if mode in ("fp8", "int8") and calib is None:
        load_texts(None)  # raises the CalibrationError with the explanation
    have_data = calib is not None
    method = o.method(mode, have_data)
    if mode in ("fp8", "int8") and method not in ("max", "entropy"):
        raise ValueError(f"{mode} calibration method must be 'max' or 'entropy', got {method!r}")
    if mode == "int4" and method not in ("awq_clip", "awq_lite", "awq_full", "rtn_dq", "rtn_asym"):
        raise ValueError(f"int4 method must be awq_clip | awq_lite | awq_full | rtn_dq | rtn_asym, got {method!r}")
    if o.weight_only and mode == "int4":
        raise ValueError("weight_only applies to fp8/int8 (int4 is always weight-only)")
    if method == "rtn_asym" and (o.gptq or o.auto_exclude):
        raise ValueError("int4 rtn_asym (asymmetric MatMulNBits, asym_int4.py) does not combine with gptq / auto_exclude "
                         "(both simulate ModelOpt's symmetric grid); use exclude patterns for mixed precision")
    if o.lm_head_bits not in (4, 8):
        raise ValueError(f"lm_head_bits must be 4 or 8, got {o.lm_head_bits!r}")
    if o.lm_head_bits == 8 and not o.quantize_lm_head:
        raise ValueError("lm_head_bits=8 without quantize_lm_head: the lm_head stays fp32; set quantize_lm_head=True")
    if o.lm_head_bits == 8 and not (mode == "int4" and method == "rtn_asym"):
        raise ValueError(f"lm_head_bits=8 (the Q8_0 lm_head, q8_blocks.py) is an int4 rtn_asym option; this is {mode} "
                         f"{method}: drop it or pass --calib-method rtn_asym")
    bad = [g for g in o.graphs if g in NEVER_GRAPHS]
    if bad:
        raise ValueError(f"graph(s) {bad} are never quantized (retrieval scores stay fp32)")
    graphs = [g for g in o.graphs if g in man["graphs"]]
    tok = tokenizer if tokenizer is not None else load_artifact_tokenizer(out)
    from mplus_deploy.model.config import MPlusConfig

    cfg = MPlusConfig.from_dict(man["config"])
    enc = encoder(tok, cfg.vocab_size)

    texts, cap = [], None
    timings = {}
    if have_data:
        texts = load_texts(calib, o.max_samples)  # validated even when unused (rtn_dq)
    mixed, smoothing, hessians, gptq_info = None, None, None, None
    if o.auto_granularity not in ("layer", "unit"):
        raise ValueError(f"auto_granularity must be 'layer' or 'unit', got {o.auto_granularity!r}")
    if not (o.auto_exclude or o.smooth_alpha is not None or o.gptq):
        model = None  # no torch stage: do not hold the model through the graphs and the report
    if o.auto_exclude or o.smooth_alpha is not None or o.gptq:
        from .mixed import plan_mixed_precision
        from .sensitivity import torch_reference
        from .smooth import prepare

        t0 = time.perf_counter()
        model = torch_reference(model, texts)
        n = min(o.max_tokens, o.sensitivity_tokens)
        n_prompt = min(n, max(2, int(man["limits"]["max_prompt"]) - o.greedy_tokens))
        if o.smooth_alpha is not None:
            smoothing = prepare(model, enc, texts, o.smooth_alpha, n, n_prompt)
        sim_w = None
        if o.gptq:
            from . import gptq as gptq_mod

            sc = smoothing["scales"] if smoothing else None
            say(f"GPTQ Hessians: memorize + prefill of {len(texts)} calibration texts (<= {n} tokens) on the torch reference")
            hessians = gptq_mod.collect_hessians(model, enc, texts, n, n_prompt, scales=sc, progress=progress)
            gptq_info = {"method": "GPTQ on ModelOpt's scales (gptq.py)", "damp": gptq_mod.DAMP, "act_order": True,
                         "hessian_texts": len(texts), "tokens_per_text": n, "hessians": len(hessians)}
            if o.auto_exclude:
                sim_w = gptq_mod.gptq_weights(model, hessians, mode, o.block_size, scales=sc, progress=progress)
        if o.auto_exclude:
            mixed = plan_mixed_precision(model, enc, texts, mode, o, o.auto_target or TOP1_TARGET[mode], int(man["limits"]["max_prompt"]),
                                         smoothing, sim_w, progress)
            o.exclude = tuple(o.exclude) + tuple(mixed["patterns"])
        timings["sensitivity_s"] = round(time.perf_counter() - t0, 2)
        say(f"torch-reference stage (Hessians / smoothing / plan) done in {timings['sensitivity_s']:.1f} s")
        # the torch reference is not used past this point (Hessians, scales and the plan are kept): at real
        # width it is the fp32 model, held through capture and ModelOpt it was what a one-layer --fp8 ran out of
        model = sim_w = None
        release_memory()
    if o.weight_only_via not in ("direct", "modelopt"):
        raise ValueError(f"weight_only_via must be 'direct' or 'modelopt', got {o.weight_only_via!r}")
    direct = o.weight_only and mode in ("fp8", "int8") and o.weight_only_via == "direct"
    if have_data and method not in ("rtn_dq", "rtn_asym") and not direct:
        t0 = time.perf_counter()
        cap_texts = texts[: o.weight_only_capture_texts] if (o.weight_only and mode in ("fp8", "int8")) else texts
        key = (str(out.resolve()), json.dumps({f: h for f, h in man.get("files", {}).items()
                                                   if f in {g["file"] for g in man["graphs"].values()} or f.startswith("memory/")},
                                                  sort_keys=True), tuple(cap_texts), o.max_tokens, o.n_decode,
               o.max_per_graph, o.seed, tok is None)
        if _CAPTURE_CACHE.get("key") == key:  # several modes in one process (bench, CLI with two flags)
            cap = _CAPTURE_CACHE["cap"]
        else:
            _CAPTURE_CACHE.clear()
            cap = cap_mod.capture(out, cap_texts, enc, max_tokens=o.max_tokens, n_decode=o.n_decode,
                                  max_per_graph=o.max_per_graph, seed=o.seed, progress=progress, desc=f"calibrate {mode}")
            _CAPTURE_CACHE.update(key=key, cap=cap)
        timings["capture_s"] = round(time.perf_counter() - t0, 2)
        say(f"calibration capture of {len(cap_texts)} texts done in {timings['capture_s']:.1f} s")
        empty = [g for g in graphs if not cap["feeds"].get(g)]
        if empty and mode != "int4":
            raise CalibrationError(f"the calibration texts never exercised graph(s) {empty}; use longer texts "
                                   "(memory_update needs chunks of >= K tokens)")

    graphs_dir = out / "graphs"
    fp32_files = sorted({Path(g["file"]).name for g in man["graphs"].values()})
    writer = SharedWriter(graphs_dir, mode, fp32_weight_index(graphs_dir, fp32_files))
    from .schemes import given

    section = {"mode": mode, "scheme": scheme or given(opts, "caller"), "graphs": {}, "calibration": {},
               "ort_level": "ORT_ENABLE_BASIC"}
    bar, gptq_cache = None, None  # GPTQ of a weight that several graphs share is solved once (gptq.ResultCache)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(graphs), desc=f"quantize {mode}", unit="graph")
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f".quant-{mode}-", dir=out) as tmp:
            if hessians is not None:
                from .gptq import ResultCache

                gptq_cache = ResultCache(Path(tmp) / "gptq-results.bin")
            gp = GraphPass(out, man, mode, o, method, direct, cap, smoothing, hessians, gptq_cache, writer, section,
                           Path(tmp), len(graphs), say, bar)
            for gi, g in enumerate(graphs):
                gp.run(gi, g)
            gp = None
            section["data_file"] = writer.commit()
            hessians = gptq_cache = None  # not needed past the graphs (the demo's are 0.44 GB)
            release_memory()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar:
            bar.close()
    timings["quantize_s"] = round(time.perf_counter() - t0, 2)
    section["weights"] = dict(writer.stats)
    section["calibration"] = {
        "source": "builtin" if calib == BUILTIN else (str(calib) if isinstance(calib, (str, os.PathLike)) else ("list" if calib else None)),
        "method": method, "texts": len(texts), "capture_texts": cap["texts"] if cap else 0,
        "max_tokens_per_text": o.max_tokens, "n_decode": o.n_decode,
        "tokens": cap["tokens"] if cap else {}, "graph_calls": cap["calls"] if cap else {},
        "samples_per_graph": {g: len(v) for g, v in cap["feeds"].items()} if cap else {},
        "tokenizer": "artifact" if tok is not None else "byte fallback (id = utf-8 byte % vocab)",
    }
    section["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.__dict__.items() if k != "extra"}
    if mixed is not None:
        section["mixed_precision"] = mixed
    if gptq_info is not None:
        section["gptq"] = gptq_info
    if smoothing is not None:
        section["smoothing"] = {k: v for k, v in smoothing.items() if k not in ("scales", "channel_amax")}

    # checks: onnx.checker + ORT BASIC session + TRT-RTX parse
    checks = {}
    for g, e in section["graphs"].items():
        if "file" not in e:
            continue
        p = out / e["file"]
        onnx.checker.check_model(str(p))
        if report:  # the report loads every quantized graph in runtime.Engine: a bad graph fails there
            checks[g] = {"onnx_checker": "ok", "ort_session": "pending (the report's runtime.Engine)"}
        else:
            ort_session(p, "basic")
            checks[g] = {"onnx_checker": "ok", "ort_session": "ok (ORT_ENABLE_BASIC)"}
        if o.trt_parse and mode in ("fp8", "int8"):
            checks[g]["trt_rtx_parse"] = trt_parse(p)
    section["checks"] = checks
    release_memory()
    say(f"checks (onnx.checker, ORT session{', TensorRT-RTX parse' if o.trt_parse and mode in ('fp8', 'int8') else ''}) of "
        f"{len(checks)} graphs done")

    rep = None
    if report:
        from . import report as rep_mod

        update_quantized(out, mode, section)  # the report runs the runtime Engine(quantized=mode): it reads this
        t0 = time.perf_counter()
        say(f"accuracy report: {o.eval_texts} held-out texts through runtime.Engine (fp32 vs {mode})")
        rep = rep_mod.evaluate(out, mode, section, enc, o, exclude_texts=texts, progress=progress, log=say)
        for ch in checks.values():
            ch["ort_session"] = f"ok (runtime.Engine, {rep['ort_level']})"
        rep["checks"] = checks
        n_ret = o.retention_facts if o.retention_facts is not None else (12 if tok is not None else 0)
        if n_ret:
            say(f"retention: {n_ret} facts at N = 0 and 10 distractor chunks, fp32 and {mode}")
            rep["retention"] = rep_mod.retention(out, mode, n_ret, o.seed, log=say)
        timings["report_s"] = round(time.perf_counter() - t0, 2)
        say(f"accuracy report done in {timings['report_s']:.1f} s: top-1 {rep['end_to_end']['top1_agreement']:.4f}")
        rep["timings"] = timings
        rep_mod.write_report(out, rep)
        section["report"] = {"json": "report/quantization.json", "md": "report/quantization.md",
                             "top1": rep["end_to_end"]["top1_agreement"], "target_top1": TOP1_TARGET[mode],
                             "meets_target": rep["meets_target"]}
    timings["total_s"] = round(time.perf_counter() - t_all, 2)
    section["timings"] = timings
    update_quantized(out, mode, section)
    if rep is None:
        rep = {"mode": mode, "quantization": section}
    if print_table and report:
        from . import report as rep_mod

        rep_mod.print_table(rep)
    return rep
