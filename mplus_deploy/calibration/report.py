"""The quantization accuracy report: the measurement (:mod:`.evaluate`: held-out text through the runtime,
fp32 pass then quantized pass) assembled with what the quantization did, written as
``report/quantization.<mode>.{json,md}`` and printed as a table.

- per graph: max / mean abs error of every output, fp32 vs quantized graph, on feeds the fp32 engine
  produced on the held-out texts (``RecordingRunner``: a reservoir of calls per graph);
- end to end: logit KL(fp32 || quant) mean and max over all prompt positions, top-1 agreement,
  perplexity of the prompt's next tokens under each and the delta, greedy agreement over
  ``greedy_tokens`` tokens (per-position and whole-sequence), retrieval agreement (mean overlap of the
  K0 retrieved LTM indices per layer).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path

import numpy as np
import torch



@torch.no_grad()
def evaluate(out: Path, mode: str, section: dict, enc, o, exclude_texts=(), progress: bool = False,
             per_graph_samples: int = 2, log=None) -> dict:
    """The report dict: :func:`.evaluate.measure` (two runtime passes, fp32 then quantized) plus what the
    quantization did (``section``: the manifest's ``quantized.<mode>`` entry, already written)."""
    from .evaluate import measure
    from .quantize import TOP1_TARGET

    m = measure(Path(out), mode, section, enc, o, exclude_texts, per_graph_samples, log)
    cfg, e2e, target = m["cfg"], m["end_to_end"], TOP1_TARGET[mode]
    return {
        "mode": mode, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "artifact": str(out), "model": {"kind": cfg.kind, "layers": cfg.num_hidden_layers,
                                        "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
        "reference": "fp32 graphs of the artifact (validated against the torch reference at export)",
        "executor": "runtime.Engine, backend onnxruntime (CPU): the graphs, optimization levels and decode loop of "
                    "mplus-run; fp32 pass, then quantized pass",
        "ort_level": m["levels"]["quantized"], "ort_level_fp32": m["levels"]["fp32"],
        "fold_dq": m["levels"].get("fold_dq"), "heldout_source": "mplus_deploy/calibration/heldout_eval.txt",
        "calibration": section.get("calibration", {}), "quantization": {g: dict(e) for g, e in section["graphs"].items()},
        "checks": section.get("checks", {}), "per_graph": m["per_graph"], "end_to_end": e2e,
        "mixed_precision": section.get("mixed_precision"), "gptq": section.get("gptq"), "exclude_patterns": list(o.exclude),
        "smoothing": section.get("smoothing"),
        "target": {"top1_agreement": target}, "meets_target": bool(e2e["positions"] and e2e["top1_agreement"] >= target),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "python": platform.python_version()},
    }


RETENTION_N = (0, 10)


def retention(out: Path, mode: str, n_facts: int, seed: int = 0, log=None) -> dict:
    """The knowledge-retention protocol (``evaluation.retention``) at N = 0 and 10 on ``n_facts`` builtin facts, on
    the fp32 graphs and on ``mode``'s, through ``runtime.Engine`` → {variant: {"rate", "hits", "facts", "seconds"}}."""
    from mplus_deploy.evaluation import retention as R
    from mplus_deploy.evaluation.facts import builtin_facts
    from mplus_deploy.runtime import Engine

    facts, st, res = builtin_facts(n_facts, seed), R.Settings(distractors=RETENTION_N, seed=seed), {}
    for variant in ("fp32", mode):
        eng = Engine(out, backend="onnxruntime", seed=seed, quantized=None if variant == "fp32" else mode)
        try:
            r = R.run(eng, facts, st, progress=False)
        finally:
            eng.close()
        res[variant] = {"rate": {str(n): r.rate[n] for n in st.distractors}, "hits": {str(n): r.hits[n] for n in st.distractors},
                        "facts": r.facts, "seconds": round(r.seconds, 1)}
        if log:
            log(f"retention {variant}: " + ", ".join(f"N={n} {r.rate[n]:.0%}" for n in st.distractors))
    return res


def _retention_md(rep: dict) -> list[str]:
    ret = rep.get("retention")
    if not ret:
        return []
    L = ["", "## Knowledge retention (builtin made-up facts, exact hit in 8 greedy tokens)", "",
         "| graphs | " + " | ".join(f"N={n}" for n in RETENTION_N) + " | seconds |",
         "| --- | " + " | ".join("---" for _ in RETENTION_N) + " | --- |"]
    for variant, r in ret.items():
        L.append(f"| {variant} | " + " | ".join(f"{r['rate'][str(n)]:.0%} ({r['hits'][str(n)]}/{r['facts']})"
                                                 for n in RETENTION_N) + f" | {r['seconds']:.0f} |")
    return L


def _cpu_name() -> str:
    from mplus_deploy.util.machine import cpu_name

    return cpu_name()


def to_markdown(rep: dict) -> str:
    e = rep["end_to_end"]
    g = e["greedy"]
    L = [f"# Quantization report: {rep['mode']}", "",
         f"Artifact `{rep['artifact']}` ({rep['model']['kind']}, {rep['model']['layers']} layers, d={rep['model']['hidden']}); "
         f"created {rep['created']}; measured on {rep.get('executor', 'onnxruntime CPU')}; quantized graphs at {rep['ort_level']}.",
         f"Reference: {rep['reference']}. Held-out text: `{rep['heldout_source']}` (never used for calibration).", "",
         "## End to end (held-out text)", "",
         "| metric | value | sample |", "| --- | --- | --- |",
         f"| top-1 agreement | {e['top1_agreement']:.4f} (95% CI {e['top1_ci95'][0]:.3f}-{e['top1_ci95'][1]:.3f}; target >= {rep['target']['top1_agreement']:.2f}: "
         f"{'met' if rep['meets_target'] else 'MISSED'}) | {e['positions']} positions, {e['texts']} prompts |",
         f"| logit KL(fp32 ‖ quant) mean / max | {e['kl_mean']:.5f} / {e['kl_max']:.4f} nats | {e['positions']} positions |",
         f"| perplexity fp32 → quant | {e['ppl_fp32']:.3f} → {e['ppl_quant']:.3f} (Δ {e['ppl_delta']:+.3f}, {100 * e['ppl_rel_delta']:+.2f} %) | {e['ppl_tokens']} tokens |",
         f"| greedy agreement after memorize ({g['tokens_per_sequence']} tokens) | {g['position_agreement']:.4f} per position; "
         f"{g['exact_sequences']:.3f} identical sequences; mean matching prefix {g['mean_prefix_match']:.1f} | {g['tokens']} tokens, {g['sequences']} sequences |"]
    if e.get("retrieval"):
        r = e["retrieval"]
        L.append(f"| retrieval agreement (overlap of the K0={r['K0']} retrieved rows) | mean {r['overlap_mean']:.4f}, min {r['overlap_min']:.3f} | {r['layer_prompts']} layer x prompt |")
    L += _retention_md(rep)
    L += ["", "## Per graph (held-out inputs, fp32 graph vs quantized graph)", "",
          "| graph | file | quantized MatMuls | method | output | max abs | mean abs | ref max abs | samples |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, q in rep["quantization"].items():
        pg = rep["per_graph"].get(name)
        if pg is None or not pg["outputs"]:
            L.append(f"| {name} | `{q.get('file', '-')}` | {q.get('quantized_nodes', 0)}/{q.get('selected', 0)} | {q.get('method', '-')} | "
                     f"{q.get('skipped', 'no held-out calls')} | | | | 0 |")
            continue
        for i, (o, r) in enumerate(pg["outputs"].items()):
            head = f"| {name} | `{q['file']}` | {q['quantized_nodes']}/{q['selected']} | {q['method']} |" if i == 0 else "| | | | |"
            if r["mismatch"] or o == "retrieved":
                L.append(f"{head} {o} | {r['mismatch']}/{r['count']} positions differ; set overlap mean "
                         f"{r.get('set_overlap_mean', 1.0):.4f} min {r.get('set_overlap_min', 1.0):.3f} | | | {pg['samples']} |")
            else:
                L.append(f"{head} {o} | {r['max_abs']:.4g} | {r['mean_abs']:.4g} | {r['ref_max']:.4g} | {pg['samples']} |")
    L += _mixed_md(rep)
    L += ["", "## Excluded from quantization", ""]
    for name, q in rep["quantization"].items():
        ex = ", ".join(f"{v} x {k}" for k, v in q.get("excluded", {}).items()) or "-"
        L.append(f"- `{name}`: {ex}")
    c = rep.get("calibration", {})
    L += ["", "## Calibration", "",
          f"source `{c.get('source')}`, method `{c.get('method')}`, {c.get('texts')} texts (<= {c.get('max_tokens_per_text')} tokens each), "
          f"tokens {c.get('tokens')}, samples kept per graph {c.get('samples_per_graph')}, tokenizer: {c.get('tokenizer')}.", ""]
    if rep.get("checks"):
        L += ["## Checks", "", "| graph | onnx.checker | ORT session | TensorRT-RTX parse |", "| --- | --- | --- | --- |"]
        for name, ch in rep["checks"].items():
            L.append(f"| {name} | {ch.get('onnx_checker')} | {ch.get('ort_session', ch.get('ort_basic'))} | {ch.get('trt_rtx_parse', 'n/a')} |")
        L.append("")
    m = rep["machine"]
    L += [f"Machine: {m['processor']}, {m['platform']}, Python {m['python']}.", ""]
    return "\n".join(L)


def _mixed_md(rep: dict) -> list[str]:
    mp, pats, sm = rep.get("mixed_precision"), rep.get("exclude_patterns") or [], rep.get("smoothing")
    L = []
    if sm:
        n = sum(e.get("smoothed_matmuls", 0) for e in rep["quantization"].values())
        L += ["", "## Channel smoothing", "",
              f"alpha {sm['alpha']} (s_j = amax(x_j)^alpha / amax(w_j)^(1-alpha); smooth.py), activation statistics from "
              f"{sm['texts']} calibration texts (<= {sm['max_tokens']} tokens); {n} MatMuls rewritten as (x / s) @ (s W)."]
    wo = sum(e.get("weight_only_matmuls", 0) for e in rep["quantization"].values())
    if wo:
        L += ["", "## Weight-only", "", f"Activation Q/DQ removed from {wo} quantized MatMuls (weight_only.py): weights "
              f"{rep['mode']}, activations fp32 — not the per-tensor-activation scheme of the default."]
    if rep.get("gptq"):
        gq = rep["gptq"]
        L += ["", "## GPTQ", "", f"Weights rounded by GPTQ on ModelOpt's scales (gptq.py; damp {gq['damp']}, act-order): "
              f"Hessians of {gq['hessians']} activations from {gq['hessian_texts']} calibration texts (<= "
              f"{gq['tokens_per_text']} tokens each); "
              f"{sum(e.get('gptq_weights', 0) for e in rep['quantization'].values())} quantized weights rewritten."]
    if not mp and not pats:
        return L
    q = sum(e.get("quantized_nodes", 0) for e in rep["quantization"].values())
    kept = sum(n for e in rep["quantization"].values() for k, n in e.get("excluded", {}).items() if "mixed precision" in k)
    L += ["", "## Mixed precision", "",
          f"{q} weight MatMuls quantized, {kept} kept fp32 by the exclude patterns "
          f"({100 * q / max(1, q + kept):.0f} % of the quantizable MatMuls quantized). Patterns: "
          + (", ".join(f"`{p}`" for p in pats) or "none") + "."]
    pq = sum(e.get("params_quantized", 0) for e in rep["quantization"].values())
    pk = sum(e.get("params_kept", 0) for e in rep["quantization"].values())
    if pq or pk:
        L[-1] += f" By weight parameters: {100 * pq / max(1, pq + pk):.0f} % quantized (over the quantized graphs)."
    if mp:
        gran = mp.get("granularity", "layer")
        kept_u = mp.get("exclude_units", [f"layers.{i}" for i in mp.get("exclude_layers", [])])
        names = mp.get("units", [f"layers.{i}" for i in range(len(mp["sensitivity"]))])
        L += ["", f"Planned by `auto_exclude` (torch simulation, calibration texts only, {mp['texts']} texts / "
              f"{mp['positions']} positions, granularity `{gran}`{', GPTQ weights' if mp.get('gptq') else ''}): keep "
              + (f"layers {mp['exclude_layers']}" if gran == "layer" else ", ".join(f"`{u}`" for u in kept_u) or "nothing")
              + f" in fp32 ({len(kept_u)}/{len(names)}); simulated top-1 {mp['sim_top1_all']:.4f} with everything "
              f"quantized → {mp['sim_top1']:.4f} (goal {mp['goal']:.3f}), {mp['evaluations']} simulated evaluations.", "",
              f"Sensitivity (simulated top-1 with only that {gran} quantized):", ""]
        if gran == "layer":
            L += ["| layer | " + " | ".join(str(i) for i in range(len(mp["sensitivity"]))) + " |",
                  "| --- | " + " | ".join("---" for _ in mp["sensitivity"]) + " |",
                  "| top-1 | " + " | ".join(f"{v:.3f}" for v in mp["sensitivity"]) + " |"]
        else:
            groups = sorted({u.split(".", 2)[2] for u in names}, key=lambda g: names.index(f"layers.0.{g}"))
            by = dict(zip(names, mp["sensitivity"]))
            n_layers = len(names) // max(1, len(groups))
            L += ["| unit | " + " | ".join(str(i) for i in range(n_layers)) + " |",
                  "| --- | " + " | ".join("---" for _ in range(n_layers)) + " |"]
            L += ["| " + g + " | " + " | ".join(f"{by[f'layers.{i}.{g}']:.3f}" + (" (fp32)" if f"layers.{i}.{g}" in kept_u else "")
                                              for i in range(n_layers)) + " |" for g in groups]
    return L


def write_report(out: Path, rep: dict) -> None:
    """``out/report/quantization.{json,md}`` (atomic). Several modes: files are per mode
    (``quantization.json`` holds the latest run and ``quantization.<mode>.json`` every mode)."""
    from mplus_deploy.util.io import atomic_write_text

    d = Path(out) / "report"
    js, md = json.dumps(rep, indent=2, default=_json_default) + "\n", to_markdown(rep) + "\n"
    atomic_write_text(d / f"quantization.{rep['mode']}.json", js)
    atomic_write_text(d / f"quantization.{rep['mode']}.md", md)
    atomic_write_text(d / "quantization.json", js)
    atomic_write_text(d / "quantization.md", md)
    for f in d.iterdir():
        if f.name.startswith("quantization"):
            f.chmod(0o644)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def print_table(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"quantization {rep['mode']} → {rep['artifact']}")
    for c in ("graph", "quantized", "output", "max abs", "mean abs", "ref max"):
        t.add_column(c, justify="left" if c in ("graph", "output") else "right")
    for name, q in rep["quantization"].items():
        pg = rep["per_graph"].get(name)
        if pg is None or not pg["outputs"]:
            t.add_row(name, f"{q.get('quantized_nodes', 0)}/{q.get('selected', 0)}",
                      q.get("skipped", "no held-out calls" if pg is not None else "-"), "", "", "")
            continue
        for i, (o, r) in enumerate(pg["outputs"].items()):
            if r["mismatch"]:
                t.add_row(name if i == 0 else "", f"{q['quantized_nodes']}/{q['selected']}" if i == 0 else "", o,
                          f"overlap {r.get('set_overlap_mean', 1.0):.4f}", f"{r['mismatch']}/{r['count']} pos", "")
            else:
                t.add_row(name if i == 0 else "", f"{q['quantized_nodes']}/{q['selected']}" if i == 0 else "", o,
                          f"{r['max_abs']:.3g}", f"{r['mean_abs']:.3g}", f"{r['ref_max']:.3g}")
    console.print(t)
    e = rep["end_to_end"]
    g = e["greedy"]
    ok = "[green]met[/green]" if rep["meets_target"] else "[red]MISSED[/red]"
    console.print(f"top-1 agreement {e['top1_agreement']:.4f} over {e['positions']} positions (target ≥ {rep['target']['top1_agreement']:.2f}: {ok}); "
                  f"KL mean {e['kl_mean']:.4g} max {e['kl_max']:.4g}; ppl {e['ppl_fp32']:.3f} → {e['ppl_quant']:.3f}; "
                  f"greedy {g['position_agreement']:.3f} over {g['tokens']} tokens ({g['exact_sequences']:.2f} identical seq)"
                  + (f"; retrieval overlap {e['retrieval']['overlap_mean']:.4f}" if e.get("retrieval") else ""))
