"""Accuracy report of a quantized artifact against its fp32 graphs (platform-notes §7 "accuracy drift").

Measured on the runtime users run: two ``runtime.Engine``s over ONNX Runtime CPU, fp32 and
``quantized=<mode>`` (the quantized graphs at the runtime's optimization level, the fp32 ones for graphs
that are not quantized; both map ``weights.data`` once), from the same initial memory state and the same
drop seed. Held-out text only (``heldout_eval.txt``, minus anything in the calibration set). Per held-out
text, from the artifact's memory state: memorize it (through the quantized ``memory_update`` on the
quantized side), prefill it as the prompt (logits of every row), then, for the first ``greedy_texts``
texts, ``greedy_tokens`` greedy steps through the runtime's decode loop (``generate.token_stream``).

- per graph: max / mean abs error of every output, fp32 vs quantized graph, on feeds the fp32 engine
  produced on the held-out texts (``RecordingRunner``: a reservoir of calls per graph, replayed on both);
- end to end: logit KL(fp32 || quant) mean and max over all prompt positions, top-1 agreement,
  perplexity of the prompt's next tokens under each and the delta, greedy agreement over
  ``greedy_tokens`` tokens (per-position and whole-sequence), retrieval agreement (mean overlap of the
  K0 retrieved LTM indices per layer).
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import heldout_texts


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _engines(out: Path, mode: str, seed: int, per_graph: int, graphs):
    """The fp32 and the quantized runtime engine (ONNX Runtime, as ``mplus-run`` / ``Engine(quantized=)`` run
    them; one mapping of the weights for both); the fp32 one records feeds for the per-graph replay."""
    from mplus_deploy.runtime import Engine
    from mplus_deploy.runtime.backends.ort_weights import SharedInitializers
    from mplus_deploy.runtime.backends.recording import RecordingRunner

    shared = SharedInitializers()
    rec = {}

    def wrap(r):
        rec["runner"] = RecordingRunner(r, per_graph, seed, graphs)
        return rec["runner"]
    ref = Engine(out, backend="onnxruntime", seed=seed, wrap=wrap, shared=shared)
    qe = Engine(out, backend="onnxruntime", seed=seed, quantized=mode, shared=shared)
    return ref, qe, rec["runner"], shared


def _prefill(eng, ids: torch.Tensor) -> tuple[dict, dict]:
    """Prefill ``ids`` on the engine's current memory, logits of every row: (outputs, memory feeds)."""
    from mplus_deploy.runtime.graph_io import all_rows

    if eng.config.is_mplus:
        eng.host_memory.check_ltm()
    feeds = eng.host_memory.prefill_feeds()
    return eng.runner.infer("prefill", {"ids": ids, "logit_rows": all_rows(ids), **feeds}), feeds


def _greedy(eng, out: dict, feeds: dict, ids: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens continuing ``out`` (that prefill), through the runtime's own decode loop."""
    from mplus_deploy.runtime.generate import token_stream

    return list(token_stream(eng.runner, eng.config.prefix_len, feeds, ids, n, prefilled=out))


@torch.no_grad()
def evaluate(out: Path, mode: str, section: dict, enc, o, exclude_texts=(), progress: bool = False,
             per_graph_samples: int = 8, log=None) -> dict:
    """The accuracy report, measured on the runtime (``runtime.Engine`` over ONNX Runtime: the graphs, levels
    and decode loop users run). ``section`` is the manifest's ``quantized.<mode>`` entry, already written."""
    from .quantize import TOP1_TARGET

    out = Path(out)
    texts = heldout_texts(list(exclude_texts))[: o.eval_texts]
    qgraphs = {g: e for g, e in section["graphs"].items() if "file" in e}
    ref, qe, rec, shared = _engines(out, mode, o.seed + 1, per_graph_samples, set(qgraphs))
    try:
        return _evaluate(out, mode, section, enc, o, texts, qgraphs, ref, qe, rec, progress, TOP1_TARGET[mode],
                         log or (lambda msg: None))
    finally:
        qe.close()
        ref.close()
        shared.clear()


def _evaluate(out, mode, section, enc, o, texts, qgraphs, ref, qe, rec, progress, target, say) -> dict:
    cfg = ref.config
    max_prompt = int(cfg.max_window) if getattr(cfg, "max_window", None) else 512
    max_prompt = min(max_prompt, int(section.get("max_prompt", max_prompt)))
    n_greedy, n_greedy_texts = int(o.greedy_tokens), int(o.greedy_texts)
    kls, top1, nll_r, nll_q, ret_overlap = [], [], [], [], []
    g_pos, g_seq, g_prefix = [], [], []
    it = texts
    if progress:
        from tqdm import tqdm

        it = tqdm(texts, desc=f"report {mode}", unit="text")
    K = int(cfg.K)
    for i, text in enumerate(it):
        ids = enc(text)[: o.max_tokens]
        if ids.numel() < 2:
            continue
        # every text starts from the artifact's memory state and the same drop seed (the untrained demo M+
        # degrades after a few dozen accumulated updates, which would measure noise); memorize the text - every
        # third one as two chunks, the first < K tokens (memory_update_short) - then query it
        for eng in (ref, qe):
            eng.reset_memory()
        h = min(K // 2, ids.numel() // 2)
        parts = [ids[:h], ids[h:]] if i % 3 == 2 and h > 0 else [ids]
        with warnings.catch_warnings():  # the short first part is deliberate (it exercises memory_update_short)
            warnings.filterwarnings("ignore", message="memorizing a chunk of", category=UserWarning)
            for part in parts:
                if part.numel():
                    ref.memorize(part, chunk_size=None, progress=False)
                    qe.memorize(part, chunk_size=None, progress=False)
        prompt = ids[: max(2, max_prompt - n_greedy)]
        (a, fa), (b, fb) = _prefill(ref, prompt), _prefill(qe, prompt)
        la, lb = _log_softmax(a["logits"].numpy()), _log_softmax(b["logits"].numpy())
        pa = np.exp(la)
        kls.append((pa * (la - lb)).sum(-1))
        top1.append(la.argmax(-1) == lb.argmax(-1))
        tgt = prompt[1:].numpy()
        nll_r.append(-la[np.arange(len(tgt)), tgt])
        nll_q.append(-lb[np.arange(len(tgt)), tgt])
        if "retrieved" in a:
            ra, rb = a["retrieved"].numpy(), b["retrieved"].numpy()
            ret_overlap.extend(len(set(x.tolist()) & set(y.tolist())) / max(1, len(x)) for x, y in zip(ra, rb))
        if i < n_greedy_texts and n_greedy > 0:
            sa, sb = _greedy(ref, a, fa, prompt, n_greedy), _greedy(qe, b, fb, prompt, n_greedy)
            eq = np.array(sa) == np.array(sb)
            g_pos.append(eq)
            g_seq.append(bool(eq.all()))
            g_prefix.append(int(np.argmin(eq)) if not eq.all() else len(eq))
        if (i + 1) % 6 == 0 and i + 1 < len(texts):
            say(f"report: {i + 1}/{len(texts)} texts, top-1 so far {float(np.concatenate(top1).mean()):.4f}")
    kl = np.concatenate(kls) if kls else np.zeros(0)
    t1 = np.concatenate(top1) if top1 else np.zeros(0, bool)
    nr, nq = (np.concatenate(nll_r), np.concatenate(nll_q)) if nll_r else (np.zeros(0), np.zeros(0))
    ppl_r, ppl_q = float(np.exp(nr.mean())) if nr.size else float("nan"), float(np.exp(nq.mean())) if nq.size else float("nan")
    gp = np.concatenate(g_pos) if g_pos else np.zeros(0, bool)
    n_pos = int(t1.size)
    e2e = {
        "texts": len(kls), "positions": n_pos, "kl_mean": float(kl.mean()) if kl.size else float("nan"),
        "kl_max": float(kl.max()) if kl.size else float("nan"),
        "top1_agreement": float(t1.mean()) if t1.size else float("nan"),
        "top1_ci95": _wilson(int(t1.sum()), n_pos),
        "ppl_fp32": ppl_r, "ppl_quant": ppl_q, "ppl_delta": ppl_q - ppl_r, "ppl_rel_delta": ppl_q / ppl_r - 1.0,
        "ppl_tokens": int(nr.size),
        "greedy": {"sequences": len(g_seq), "tokens_per_sequence": n_greedy, "tokens": int(gp.size),
                   "position_agreement": float(gp.mean()) if gp.size else float("nan"),
                   "exact_sequences": float(np.mean(g_seq)) if g_seq else float("nan"),
                   "mean_prefix_match": float(np.mean(g_prefix)) if g_prefix else float("nan")},
        "retrieval": ({"overlap_mean": float(np.mean(ret_overlap)), "overlap_min": float(np.min(ret_overlap)),
                       "layer_prompts": len(ret_overlap), "K0": int(cfg.K0)} if ret_overlap else None),
    }
    # per-graph errors on held-out inputs: the feeds the fp32 engine recorded, replayed on both runners
    per_graph = {}
    for g in qgraphs:
        feeds = rec.samples.get(g, [])
        res = {"samples": len(feeds), "outputs": {}}
        for f in feeds:
            ya, yb = rec.inner.infer(g, f), qe.runner.infer(g, f)
            for n in ya:
                x, y = ya[n].numpy(), yb[n].numpy()
                r = res["outputs"].setdefault(n, {"max_abs": 0.0, "sum_abs": 0.0, "count": 0, "ref_max": 0.0, "mismatch": 0})
                if np.issubdtype(x.dtype, np.floating):
                    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                    r["max_abs"] = max(r["max_abs"], float(d.max(initial=0.0)))
                    r["sum_abs"] += float(d.sum())
                    r["count"] += int(d.size)
                    r["ref_max"] = max(r["ref_max"], float(np.abs(x).max(initial=0.0)))
                else:
                    r["mismatch"] += int((x != y).sum())
                    r["count"] += int(x.size)
                    if n == "retrieved":  # set overlap per layer (indices are in prefix order: one swap shifts many)
                        ov = [len(set(u.tolist()) & set(w.tolist())) / max(1, len(u)) for u, w in zip(x, y)]
                        r.setdefault("overlaps", []).extend(ov)
        for n, r in res["outputs"].items():
            r["mean_abs"] = r.pop("sum_abs") / max(1, r["count"])
            if "overlaps" in r:
                ov = r.pop("overlaps")
                r["set_overlap_mean"], r["set_overlap_min"] = float(np.mean(ov)), float(np.min(ov))
        per_graph[g] = res
    rep = {
        "mode": mode, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "artifact": str(out), "model": {"kind": cfg.kind, "layers": cfg.num_hidden_layers,
                                        "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
        "reference": "fp32 graphs of the artifact (validated against the torch reference at export)",
        "executor": "runtime.Engine, backend onnxruntime (CPU): the graphs, optimization levels and decode loop of "
                    "mplus-run",
        "ort_level": _level(qe.runner.describe()), "ort_level_fp32": _level(rec.describe()),
        "heldout_source": "mplus_deploy/calibration/heldout_eval.txt",
        "calibration": section.get("calibration", {}), "quantization": {g: {k: v for k, v in e.items()} for g, e in section["graphs"].items()},
        "checks": section.get("checks", {}), "per_graph": per_graph, "end_to_end": e2e,
        "mixed_precision": section.get("mixed_precision"), "gptq": section.get("gptq"), "exclude_patterns": list(o.exclude),
        "smoothing": section.get("smoothing"),
        "target": {"top1_agreement": target}, "meets_target": bool(n_pos and e2e["top1_agreement"] >= target),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "python": platform.python_version()},
    }
    return rep


def _level(d: dict) -> str:
    return {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
            "disable": "ORT_DISABLE_ALL"}.get(d.get("graph_optimization"), str(d.get("graph_optimization")))


def _wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [float(c - h), float(c + h)]


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
        L += ["## Checks", "", "| graph | onnx.checker | ORT BASIC | TensorRT-RTX parse |", "| --- | --- | --- | --- |"]
        for name, ch in rep["checks"].items():
            L.append(f"| {name} | {ch.get('onnx_checker')} | {ch.get('ort_basic')} | {ch.get('trt_rtx_parse', 'n/a')} |")
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
