"""The accuracy measurement behind the quantization report (platform-notes §7 "accuracy drift"), on the runtime
users run.

Two passes over the same held-out texts (``heldout_eval.txt``, minus anything in the calibration set), one
``runtime.Engine`` at a time, so the process holds one set of weights, not two: ``Engine(OUT)`` (fp32), then
``Engine(OUT, quantized=mode)`` (the quantized graphs at the runtime's optimization level, the fp32 ones for
graphs that are not quantized). Each text starts from the artifact's memory state with the same drop seed:
memorize it (every third one as two chunks, the first < K tokens, so ``memory_update_short`` runs too), prefill
it as the prompt (logits of every row), and for the first ``greedy_texts`` texts ``greedy_tokens`` greedy
steps through the runtime's decode loop (``generate.token_stream``). The fp32 pass writes each text's
log-probabilities (float32, [positions, vocab]) to a scratch folder in the artifact; the quantized pass
compares text by text against them (KL, top-1, perplexity, retrieval, greedy agreement).

Per graph, the fp32 engine's runner is wrapped in a ``RecordingRunner`` (a reservoir of calls per quantized
graph); those feeds and their fp32 outputs are saved (safetensors, same scratch folder) and replayed on the
quantized runner.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mplus_deploy.util.machine import trim_heap

from .data import heldout_texts

# Both engines run the artifact's decode graph as exported: the replayed per-graph feeds are in its contract, and
# the report measures the graphs the artifact ships (the runtime's fused attention, runtime/backends/ort_gqa.py, is
# the same math: tests/runtime/test_ort_gqa.py)
ATTENTION = "graph"


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


def _pass(eng, plan, o, say, tag: str, sink) -> None:
    """Run every planned text on ``eng``; ``sink(i, result)`` takes each text's log-probs of the prompt rows,
    retrieved rows and greedy tokens (so no pass holds the log-probs of all texts)."""
    from mplus_deploy.artifact.graph_io import all_rows
    from mplus_deploy.model.rules import check_ltm
    from mplus_deploy.model.sampling import SamplingParams
    from mplus_deploy.runtime.generate import token_stream

    for i, (parts, prompt) in enumerate(plan):
        eng.reset_memory()  # the artifact's memory and the engine's seed: the same drops in both passes
        with warnings.catch_warnings():  # the short first part is deliberate (it exercises memory_update_short)
            warnings.filterwarnings("ignore", message="memorizing a chunk of", category=UserWarning)
            for part in parts:
                eng.memorize(part, chunk_size=None, progress=False)
        if eng.config.is_mplus:
            check_ltm(eng.host_memory.state.ltm_rows)
        feeds = eng.host_memory.prefill_feeds()
        out = eng.runner.infer("prefill", {"ids": prompt, "logit_rows": all_rows(prompt), **feeds})
        r = {"logp": log_softmax(out["logits"].numpy()).astype(np.float32),
             "retrieved": out["retrieved"].numpy() if "retrieved" in out else None}
        if i < int(o.greedy_texts) and int(o.greedy_tokens) > 0:
            greedy = SamplingParams(max_new_tokens=int(o.greedy_tokens), stop_at_eos=False)
            r["greedy"] = list(token_stream(eng.runner, eng.config.prefix_len, feeds, prompt, greedy, prefilled=out))
        del out, feeds
        sink(i, r)
        trim_heap()  # each text's freed log-prob and arena blocks: heap holes otherwise (+0.5 GB on the demo)
        if (i + 1) % 8 == 0 and i + 1 < len(plan):
            say(f"report ({tag}): {i + 1}/{len(plan)} texts")


class _Compare:
    """Accumulates the end-to-end statistics, text by text, of the quantized pass against the stored fp32 one."""

    def __init__(self, plan, ref_dir: Path, ref_small: dict):
        self.plan, self.dir, self.small = plan, ref_dir, ref_small
        self.kls, self.top1, self.nll_r, self.nll_q, self.ret = [], [], [], [], []
        self.g_pos, self.g_seq, self.g_prefix = [], [], []

    def __call__(self, i: int, b: dict) -> None:
        a = {"logp": np.load(self.dir / f"ref{i}.npy"), **self.small[i]}
        la, lb = a["logp"].astype(np.float64), b["logp"].astype(np.float64)
        self.kls.append((np.exp(la) * (la - lb)).sum(-1))
        self.top1.append(la.argmax(-1) == lb.argmax(-1))
        tgt = self.plan[i][1][1:].numpy()
        self.nll_r.append(-la[np.arange(len(tgt)), tgt])
        self.nll_q.append(-lb[np.arange(len(tgt)), tgt])
        if a["retrieved"] is not None:
            self.ret.extend(len(set(x.tolist()) & set(y.tolist())) / max(1, len(x))
                            for x, y in zip(a["retrieved"], b["retrieved"]))
        if "greedy" in a:
            eq = np.array(a["greedy"]) == np.array(b["greedy"])
            self.g_pos.append(eq)
            self.g_seq.append(bool(eq.all()))
            self.g_prefix.append(int(np.argmin(eq)) if not eq.all() else len(eq))

    def result(self, n_greedy: int, K0: int) -> dict:
        cat = lambda xs, dt=np.float64: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        kl, t1, nr, nq, gp = cat(self.kls), cat(self.top1, bool), cat(self.nll_r), cat(self.nll_q), cat(self.g_pos, bool)
        nan = float("nan")
        ppl_r, ppl_q = (float(np.exp(nr.mean())), float(np.exp(nq.mean()))) if nr.size else (nan, nan)
        n_pos = int(t1.size)
        return {
            "texts": len(self.kls), "positions": n_pos, "kl_mean": float(kl.mean()) if kl.size else nan,
            "kl_max": float(kl.max()) if kl.size else nan, "top1_agreement": float(t1.mean()) if t1.size else nan,
            "top1_ci95": wilson(int(t1.sum()), n_pos),
            "ppl_fp32": ppl_r, "ppl_quant": ppl_q, "ppl_delta": ppl_q - ppl_r, "ppl_rel_delta": ppl_q / ppl_r - 1.0,
            "ppl_tokens": int(nr.size),
            "greedy": {"sequences": len(self.g_seq), "tokens_per_sequence": n_greedy, "tokens": int(gp.size),
                       "position_agreement": float(gp.mean()) if gp.size else nan,
                       "exact_sequences": float(np.mean(self.g_seq)) if self.g_seq else nan,
                       "mean_prefix_match": float(np.mean(self.g_prefix)) if self.g_prefix else nan},
            "retrieval": ({"overlap_mean": float(np.mean(self.ret)), "overlap_min": float(np.min(self.ret)),
                           "layer_prompts": len(self.ret), "K0": K0} if self.ret else None),
        }


@torch.no_grad()
def measure(out: Path, mode: str, section: dict, enc, o, exclude_texts=(), per_graph_samples: int = 2,
            say=None) -> dict:
    """→ ``{"end_to_end": ..., "per_graph": ..., "levels": ..., "cfg": ...}`` for the report (:mod:`.report`).

    What the fp32 pass leaves for the quantized one (each text's log-probs, the recorded graph calls and their
    fp32 outputs) goes to a scratch folder inside ``out`` (deleted at the end), not into memory: at the demo's
    vocabulary the log-probs alone are 0.2 GB, and they would sit beside the second engine."""
    import tempfile

    from mplus_deploy.artifact import load_manifest
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

    with tempfile.TemporaryDirectory(prefix=".report-", dir=out) as tmp:
        tmp = Path(tmp)
        small: dict[int, dict] = {}

        def keep(i, r):
            np.save(tmp / f"ref{i}.npy", r.pop("logp"))
            small[i] = r

        ref = Engine(out, backend="onnxruntime", seed=seed, wrap=wrap, attention=ATTENTION)
        try:
            plan = _plan(texts, enc, o, int(ref.config.K), int(man["limits"]["max_prompt"]))
            _pass(ref, plan, o, say, "fp32", keep)
            replay = _save_replay(box["rec"], qgraphs, tmp)
            levels = {"fp32": _level(ref.runner.describe())}
            cfg = ref.config
        finally:
            ref.close()
            box.clear()
        _trim()
        say(f"report (fp32): {len(plan)} texts done; quantized pass")
        cmp = _Compare(plan, tmp, small)
        qe = Engine(out, backend="onnxruntime", seed=seed, quantized=mode, attention=ATTENTION)
        try:
            _pass(qe, plan, o, say, mode, cmp)
            per_graph = {g: _graph_errors(qe.runner, g, replay[g]) for g in qgraphs}
            levels.update(quantized=_level(qe.runner.describe()), fold_dq=qe.runner.describe().get("fold_dq"))
        finally:
            qe.close()
    return {"end_to_end": cmp.result(int(o.greedy_tokens), int(cfg.K0)), "per_graph": per_graph,
            "levels": levels, "cfg": cfg}


def _save_replay(rec, graphs, tmp: Path) -> dict[str, list[Path]]:
    """The recorded calls of each graph with their fp32 outputs, one safetensors file per call."""
    from safetensors.torch import save_file

    files = {}
    for g in graphs:
        files[g] = []
        for j, f in enumerate(rec.samples.get(g, [])):
            y = rec.inner.infer(g, f)
            p = tmp / f"replay-{g}-{j}.safetensors"
            save_file({**{f"in.{k}": v.contiguous() for k, v in f.items()},
                       **{f"out.{k}": v.contiguous() for k, v in y.items()}}, str(p))
            files[g].append(p)
            del y
        rec.samples.pop(g, None)
    return files


def _graph_errors(runner, g: str, files) -> dict:
    """Max / mean abs error of every output of graph ``g``: recorded fp32 outputs vs the quantized runner."""
    from safetensors.torch import load_file

    res = {"samples": len(files), "outputs": {}}
    for p in files:
        t = load_file(str(p))
        feeds = {k[3:]: v for k, v in t.items() if k.startswith("in.")}
        ya = {k[4:]: v for k, v in t.items() if k.startswith("out.")}
        yb = runner.infer(g, feeds)
        for n in ya:
            x, y = ya[n].numpy(), yb[n].numpy()
            r = res["outputs"].setdefault(n, {"max_abs": 0.0, "sum_abs": 0.0, "count": 0, "ref_max": 0.0, "mismatch": 0})
            if np.issubdtype(x.dtype, np.floating):
                mx, sm = _abs_error(x, y)
                r["max_abs"] = max(r["max_abs"], mx)
                r["sum_abs"] += sm
                r["count"] += int(x.size)
                r["ref_max"] = max(r["ref_max"], float(np.abs(x).max(initial=0.0)))
            else:
                r["mismatch"] += int((x != y).sum())
                r["count"] += int(x.size)
                if n == "retrieved":  # set overlap per layer (indices are in prefix order: one swap shifts many)
                    ov = [len(set(u.tolist()) & set(w.tolist())) / max(1, len(u)) for u, w in zip(x, y)]
                    r.setdefault("overlaps", []).extend(ov)
        del t, feeds, ya, yb
        trim_heap()
    for r in res["outputs"].values():
        r["mean_abs"] = r.pop("sum_abs") / max(1, r["count"])
        if "overlaps" in r:
            ov = r.pop("overlaps")
            r["set_overlap_mean"], r["set_overlap_min"] = float(np.mean(ov)), float(np.min(ov))
    return res


def _abs_error(x: np.ndarray, y: np.ndarray, block: int = 1 << 20) -> tuple[float, float]:
    """(max, sum) of ``|x - y|`` in float64, a block of elements at a time (a whole memory state or the logits of
    every prompt row in float64 would be three transient copies of it)."""
    x, y = x.reshape(-1), y.reshape(-1)
    mx, sm = 0.0, 0.0
    for i in range(0, x.size, block):
        d = np.abs(x[i:i + block].astype(np.float64) - y[i:i + block].astype(np.float64))
        mx, sm = max(mx, float(d.max(initial=0.0))), sm + float(d.sum())
    return mx, sm


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
