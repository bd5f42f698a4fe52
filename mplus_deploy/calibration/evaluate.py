"""The accuracy measurement behind the quantization report (platform-notes §7 "accuracy drift"), on the runtime
users run.

Two passes over the same held-out texts (``heldout_eval.txt``, minus anything in the calibration set), one
``runtime.Engine`` at a time, so the process holds one set of weights, not two: ``Engine(OUT)`` (fp32), then
``Engine(OUT, quantized=mode)`` (the quantized graphs at the runtime's optimization level, the fp32 ones for
graphs that are not quantized). Each text starts from the artifact's memory state with the same drop seed:
memorize it (every third one as two chunks, the first < K tokens, so ``memory_update_short`` runs too), prefill
it as the prompt (logits of every row), and for the first ``greedy_texts`` texts ``greedy_tokens`` greedy
steps through the runtime's decode loop (``generate.token_stream``). The fp32 pass keeps its log-probabilities
(float32, [positions, vocab]) for the KL of the second.

Per graph, the fp32 engine's runner is wrapped in a ``RecordingRunner`` (a reservoir of calls per quantized
graph); those feeds and the fp32 outputs are kept and replayed on the quantized runner.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .data import heldout_texts


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _plan(texts, enc, o, K: int, max_prompt: int) -> list[tuple[list, torch.Tensor]]:
    """(memorized parts, prompt) per usable held-out text."""
    out = []
    for text in texts:
        ids = enc(text)[: o.max_tokens]
        if ids.numel() < 2:
            continue
        h = min(K // 2, ids.numel() // 2)
        parts = [ids[:h], ids[h:]] if len(out) % 3 == 2 and h > 0 else [ids]
        out.append(([p for p in parts if p.numel()], ids[: max(2, max_prompt - int(o.greedy_tokens))]))
    return out


def _pass(eng, plan, o, say, tag: str) -> list[dict]:
    """Run every planned text on ``eng``: per text the log-probs of the prompt rows, retrieval, greedy tokens."""
    from mplus_deploy.runtime.generate import token_stream
    from mplus_deploy.runtime.graph_io import all_rows

    res = []
    for i, (parts, prompt) in enumerate(plan):
        eng.reset_memory()  # the artifact's memory and the engine's seed: the same drops in both passes
        with warnings.catch_warnings():  # the short first part is deliberate (it exercises memory_update_short)
            warnings.filterwarnings("ignore", message="memorizing a chunk of", category=UserWarning)
            for part in parts:
                eng.memorize(part, chunk_size=None, progress=False)
        if eng.config.is_mplus:
            eng.host_memory.check_ltm()
        feeds = eng.host_memory.prefill_feeds()
        out = eng.runner.infer("prefill", {"ids": prompt, "logit_rows": all_rows(prompt), **feeds})
        r = {"logp": log_softmax(out["logits"].numpy()).astype(np.float32),
             "retrieved": out["retrieved"].numpy() if "retrieved" in out else None}
        if i < int(o.greedy_texts) and int(o.greedy_tokens) > 0:
            r["greedy"] = list(token_stream(eng.runner, eng.config.prefix_len, feeds, prompt, int(o.greedy_tokens),
                                            prefilled=out))
        del out, feeds
        res.append(r)
        if (i + 1) % 8 == 0 and i + 1 < len(plan):
            say(f"report ({tag}): {i + 1}/{len(plan)} texts")
    return res


@torch.no_grad()
def measure(out: Path, mode: str, section: dict, enc, o, exclude_texts=(), per_graph_samples: int = 4,
            say=None) -> dict:
    """→ ``{"end_to_end": ..., "per_graph": ..., "levels": ...}`` for the report (:mod:`.report`)."""
    from mplus_deploy.export.manifest import load_manifest
    from mplus_deploy.runtime import Engine
    from mplus_deploy.runtime.backends.recording import RecordingRunner

    say = say or (lambda msg: None)
    out = Path(out)
    man = load_manifest(out, verify=False)
    texts = heldout_texts(list(exclude_texts))[: o.eval_texts]
    qgraphs = [g for g, e in section["graphs"].items() if "file" in e]
    seed = o.seed + 1
    box = {}

    def wrap(r):
        box["rec"] = RecordingRunner(r, per_graph_samples, seed, set(qgraphs))
        return box["rec"]

    ref = Engine(out, backend="onnxruntime", seed=seed, wrap=wrap)
    try:
        plan = _plan(texts, enc, o, int(ref.config.K), int(man["limits"]["max_prompt"]))
        A = _pass(ref, plan, o, say, "fp32")
        rec = box["rec"]
        replay = {g: [(f, rec.inner.infer(g, f)) for f in rec.samples.get(g, [])] for g in qgraphs}
        levels = {"fp32": _level(ref.runner.describe())}
        cfg = ref.config
    finally:
        ref.close()
    _trim()
    say(f"report (fp32): {len(plan)} texts done; quantized pass")
    qe = Engine(out, backend="onnxruntime", seed=seed, quantized=mode)
    try:
        B = _pass(qe, plan, o, say, mode)
        per_graph = {g: _graph_errors(qe.runner, g, replay[g]) for g in qgraphs}
        levels.update(quantized=_level(qe.runner.describe()), fold_dq=qe.runner.describe().get("fold_dq"))
    finally:
        qe.close()
    return {"end_to_end": _end_to_end(plan, A, B, int(o.greedy_tokens), int(cfg.K0)), "per_graph": per_graph,
            "levels": levels, "cfg": cfg}


def _end_to_end(plan, A, B, n_greedy: int, K0: int) -> dict:
    kls, top1, nll_r, nll_q, ret, g_pos, g_seq, g_prefix = [], [], [], [], [], [], [], []
    for (parts, prompt), a, b in zip(plan, A, B):
        la, lb = a["logp"].astype(np.float64), b["logp"].astype(np.float64)
        kls.append((np.exp(la) * (la - lb)).sum(-1))
        top1.append(la.argmax(-1) == lb.argmax(-1))
        tgt = prompt[1:].numpy()
        nll_r.append(-la[np.arange(len(tgt)), tgt])
        nll_q.append(-lb[np.arange(len(tgt)), tgt])
        if a["retrieved"] is not None:
            ret.extend(len(set(x.tolist()) & set(y.tolist())) / max(1, len(x)) for x, y in zip(a["retrieved"], b["retrieved"]))
        if "greedy" in a:
            eq = np.array(a["greedy"]) == np.array(b["greedy"])
            g_pos.append(eq)
            g_seq.append(bool(eq.all()))
            g_prefix.append(int(np.argmin(eq)) if not eq.all() else len(eq))
    cat = lambda xs, dt=np.float64: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    kl, t1, nr, nq, gp = cat(kls), cat(top1, bool), cat(nll_r), cat(nll_q), cat(g_pos, bool)
    nan = float("nan")
    ppl_r, ppl_q = (float(np.exp(nr.mean())), float(np.exp(nq.mean()))) if nr.size else (nan, nan)
    n_pos = int(t1.size)
    return {
        "texts": len(kls), "positions": n_pos, "kl_mean": float(kl.mean()) if kl.size else nan,
        "kl_max": float(kl.max()) if kl.size else nan, "top1_agreement": float(t1.mean()) if t1.size else nan,
        "top1_ci95": wilson(int(t1.sum()), n_pos),
        "ppl_fp32": ppl_r, "ppl_quant": ppl_q, "ppl_delta": ppl_q - ppl_r, "ppl_rel_delta": ppl_q / ppl_r - 1.0,
        "ppl_tokens": int(nr.size),
        "greedy": {"sequences": len(g_seq), "tokens_per_sequence": n_greedy, "tokens": int(gp.size),
                   "position_agreement": float(gp.mean()) if gp.size else nan,
                   "exact_sequences": float(np.mean(g_seq)) if g_seq else nan,
                   "mean_prefix_match": float(np.mean(g_prefix)) if g_prefix else nan},
        "retrieval": ({"overlap_mean": float(np.mean(ret)), "overlap_min": float(np.min(ret)),
                       "layer_prompts": len(ret), "K0": K0} if ret else None),
    }


def _graph_errors(runner, g: str, samples) -> dict:
    """Max / mean abs error of every output of graph ``g``: recorded fp32 outputs vs the quantized runner."""
    res = {"samples": len(samples), "outputs": {}}
    for feeds, ya in samples:
        yb = runner.infer(g, feeds)
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
    for r in res["outputs"].values():
        r["mean_abs"] = r.pop("sum_abs") / max(1, r["count"])
        if "overlaps" in r:
            ov = r.pop("overlaps")
            r["set_overlap_mean"], r["set_overlap_min"] = float(np.mean(ov)), float(np.min(ov))
    return res


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [float(c - h), float(c + h)]


def _level(d: dict) -> str:
    return {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
            "disable": "ORT_DISABLE_ALL"}.get(d.get("graph_optimization"), str(d.get("graph_optimization")))


def _trim() -> None:
    from mplus_deploy.util.machine import release_memory

    release_memory()
