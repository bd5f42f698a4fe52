"""End-to-end comparison (CPU), one run: the torch reference ``MPlus`` (direct path = the official-style
baseline), the torch fast path (``fast_path=True``, memory K/V once per memory state), ``Engine`` on
ONNX Runtime fp32, and ONNX Runtime int8 / int4 artifacts where available, on ``small`` and ``demo``.

Per variant, same prompt / document / initial memory / seed, greedy:
- memorize tok/s (``inject`` / ``memorize`` of whole ``max_chunk`` chunks),
- query latency = prefill with retrieval + the first token (median of ``--runs``),
- decode tok/s = (time(new + 1 tokens) − time(1 token)) / new, median runs (end to end, host loop included),
- achieved decode bandwidth (bytes a step must read: decode weights + KV cache incl. the memory prefix,
  mplus_deploy.profiling.bandwidth) next to the machine's measured read bandwidth,
- whether the greedy tokens equal the reference's.
Ratios are against the torch reference. Appends a dated block under "## End-to-end comparison (CPU)" in
bench/RESULTS.md (never rewrites existing text).

Quantized artifacts come from ``mplus-export --int8 / --int4`` (another issue); pass them with
``--quant DIR`` (the manifest says which precision), else they are skipped with a note.

    python bench/compare.py [--models small,demo] [--quick] [--artifact-small DIR] [--artifact-demo DIR]
                            [--quant DIR ...] [--runs 3] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## End-to-end comparison (CPU)"
RESULTS = ROOT / "bench" / "RESULTS.md"


def _median(fn, runs: int) -> float:
    from mplus_deploy.util.machine import median_time

    return median_time(fn, runs)


def _ids(n, vocab, seed):
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


QUANT_MODES = ("int8", "int4")


def quant_modes(path: Path) -> list[str]:
    """int8 / int4 graph sets an artifact carries (``manifest["quantized"][mode]``, written by
    ``mplus_deploy.calibration.quantize_artifact`` / ``mplus-export --int8/--int4``)."""
    m = json.loads((Path(path) / "manifest.json").read_text())
    q = m.get("quantized") or {}
    return [k for k in QUANT_MODES if isinstance(q.get(k), dict) and (q[k].get("graphs") or {})]


def quant_export_note() -> str:
    """Why no int8 / int4 artifact was produced here (the exporter's own message)."""
    try:
        from mplus_deploy.cli.export import GROUPS, UsageError, build_parser
    except ImportError as e:
        return f"exporter unavailable ({e})"
    groups = [G() for G in GROUPS]
    p = build_parser(groups)
    try:
        a = p.parse_args(["small", "-o", "/nonexistent/x", "--int8"])
        groups[2].parse(a)
    except UsageError as e:
        return f"`mplus-export --int8`: {e}"
    except SystemExit:
        return "`mplus-export` has no --int8 flag"
    return "`mplus-export --int8/--int4` exists: export them and pass --quant DIR"


def load_model(name: str):
    from mplus_deploy.model import MPlus, preset

    if name == "demo":
        from mplus_deploy.model.presets import demo_model

        return demo_model()[0]
    return MPlus.from_config(preset(name), seed=0)


def export(name: str, model, tmp: Path) -> Path:
    from mplus_deploy.build import export_artifact

    out = tmp / name
    t0 = time.perf_counter()
    export_artifact(model, out, validate=False, source={"preset": name})
    print(f"[{name}] exported in {time.perf_counter() - t0:.0f} s → {out}", flush=True)
    return out


class TorchVariant:
    def __init__(self, model, fast: bool):
        self.m, self.fast = model, fast
        self.init = model.memory.clone()
        self.name = "torch fast path" if fast else "torch reference (direct)"

    def reset(self):
        self.m.memory = self.init.clone()
        self.m.memory.seed(0)
        self.m.fast_path = self.fast

    def memorize(self, doc):
        self.m.inject(doc)

    def generate(self, ids, n):
        self.m.fast_path = self.fast
        return self.m.generate(ids, max_new_tokens=n, stop_at_eos=False)

    def weight_bytes(self):
        from mplus_deploy.profiling.bandwidth import torch_decode_weight_bytes

        return torch_decode_weight_bytes(self.m)


class EngineVariant:
    """``Engine`` on ONNX Runtime; with ``quant``, ``Engine(quantized=quant)``: the artifact's quantized graph
    files in place of the fp32 ones."""

    def __init__(self, art: Path, label: str, threads: int, quant: str | None = None):
        from mplus_deploy.runtime import Engine

        self.art, self.name, self.quant = art, label, quant
        self.eng = Engine(str(art), backend="onnxruntime", threads=threads, seed=0, quantized=quant)
        self.manifest = self.eng.source.manifest
        self.sess = self.eng.session(seed=0)

    def reset(self):
        self.sess = self.eng.session(seed=0)

    def memorize(self, doc):
        self.sess.memorize(doc, chunk_size=None, progress=False)

    def generate(self, ids, n):
        return self.sess.generate_ids(ids, max_new_tokens=n, stop_at_eos=False)

    def weight_bytes(self):
        from mplus_deploy.profiling.bandwidth import onnx_decode_weight_bytes
        from mplus_deploy.artifact import graph_path

        q = (self.manifest.get("quantized") or {}).get(self.quant or "", {}).get("graphs", {}).get("decode", {})
        return onnx_decode_weight_bytes(self.art / q["file"] if "file" in q else graph_path(self.art, self.manifest, "decode"))


def measure(v, cfg, doc, prompt, new: int, runs: int) -> dict:
    import torch

    from mplus_deploy.profiling.bandwidth import decode_traffic

    v.reset()
    v.memorize(doc[: cfg.max_chunk])  # warm-up
    mem_t = []
    for _ in range(max(1, runs - 1)):
        v.reset()
        t0 = time.perf_counter()
        v.memorize(doc)
        mem_t.append(time.perf_counter() - t0)
    v.reset()  # queries on the initial memory
    v.generate(prompt, 2)  # warm-up (builds cached memory K/V / feed buffers)
    q = _median(lambda: v.generate(prompt, 1), runs)
    full = _median(lambda: v.generate(prompt, new + 1), runs)
    step = max(full - q, 1e-9) / new
    toks = v.generate(prompt, new)
    tr = decode_traffic(cfg, v.weight_bytes(), prompt.numel(), new + 1, 4)
    return {"variant": v.name, "memorize_tok_s": doc.numel() / statistics.median(mem_t), "query_ms": q * 1e3,
            "decode_tok_s": 1 / step, "decode_gbps": tr["bytes_per_step"] / step / 1e9,
            "bytes_per_step_mb": tr["bytes_per_step"] / 2**20, "tokens": torch.as_tensor(toks)}


def run_model(name: str, a, tmp: Path, notes: list) -> tuple[dict, list]:
    import torch

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    model = load_model(name)
    cfg = model.config
    art = getattr(a, f"artifact_{name}", None)
    art = Path(art) if art else export(name, model, tmp)
    prompt_len = min(a.prompt, cfg.max_window - a.new - 1)
    doc = _ids(a.doc_chunks * cfg.max_chunk, cfg.vocab_size, 1)
    prompt = _ids(prompt_len, cfg.vocab_size, 2)
    variants = [TorchVariant(model, fast=False), TorchVariant(model, fast=True),
                EngineVariant(art, "ORT fp32", a.threads)]
    found = [(art, q) for q in quant_modes(art)]
    for qd in a.quant:
        try:
            src = json.loads((Path(qd) / "manifest.json").read_text()).get("source") or {}
            modes = quant_modes(Path(qd))
        except (OSError, json.JSONDecodeError) as e:
            notes.append(f"{name}: --quant {qd} unreadable ({e})")
            continue
        if src.get("preset") != name:
            continue
        if not modes:
            notes.append(f"{name}: --quant {qd} has no int8/int4 graphs in its manifest; skipped")
        found += [(Path(qd), q) for q in modes if (Path(qd), q) not in found]
    for qd, q in found:
        variants.append(EngineVariant(qd, f"ORT {q}", a.threads, quant=q))
    missing = [q for q in QUANT_MODES if q not in {q for _, q in found}]
    if missing:
        notes.append(f"{name}: ORT {' / '.join(missing)} skipped: no artifact of this model with "
                     f"manifest['quantized'][{missing[0]!r}] (pass --quant DIR); " + quant_export_note())
    rows = []
    for v in variants:
        r = measure(v, cfg, doc, prompt, a.new, a.runs)
        rows.append(r)
        print(f"[{name}] {r['variant']}: memorize {r['memorize_tok_s']:.0f} tok/s, query {r['query_ms']:.1f} ms, "
              f"decode {r['decode_tok_s']:.1f} tok/s ({r['decode_gbps']:.2f} GB/s)", flush=True)
    ref = rows[0]
    for r in rows:
        r["same_tokens"] = bool(torch.equal(r["tokens"], ref["tokens"]))
        n = min(len(r["tokens"]), len(ref["tokens"]))
        r["agree"] = int((r["tokens"][:n] == ref["tokens"][:n]).long().cumprod(0).sum()) if n else 0
    info = {"model": name, "prompt": prompt_len, "new": a.new, "doc_tokens": doc.numel(), "runs": a.runs,
            "L": cfg.num_hidden_layers, "d": cfg.hidden_size, "P": cfg.prefix_len, "artifact": str(art),
            "seconds": time.perf_counter() - t0}
    return info, rows


def markdown(results, notes, mach, bw, a) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/compare.py"
             + (" --quick" if a.quick else "") + f" --models {','.join(a.models)}`", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']:.0f} GiB RAM, Python {mach['python']}, "
             f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}; threads={a.threads}; fp32; measured memory "
             f"bandwidth: read {bw['read_gbps']:.1f} GB/s, copy (r+w) {bw['copy_gbps']:.1f} GB/s. Medians of {a.runs} runs; "
             "greedy; same prompt, document, initial memory and drop seed for every variant. Ratios vs the torch "
             "reference (> 1 = faster).", ""]
    head = ["model", "variant", "memorize tok/s", "× ref", "query ms (prefill + 1st tok)", "× ref", "decode tok/s",
            "× ref", "decode GB/s (bytes/step MiB)", "greedy = ref"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for info, rows in results:
        ref = rows[0]
        for r in rows:
            same = "yes" if r["same_tokens"] else f"first {r['agree']}/{len(ref['tokens'])}"
            lines.append(
                f"| {info['model']} (T={info['prompt']}, {info['new']} new, P={info['P']}) | {r['variant']} | "
                f"{r['memorize_tok_s']:.0f} | {r['memorize_tok_s'] / ref['memorize_tok_s']:.2f}x | {r['query_ms']:.1f} | "
                f"{ref['query_ms'] / r['query_ms']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / ref['decode_tok_s']:.2f}x | "
                f"{r['decode_gbps']:.2f} ({r['bytes_per_step_mb']:.0f}) | {same} |")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append("- The machine is a shared 2-core VM: other jobs ran during the measurement, so single numbers can be "
                 "off by tens of percent; ratios within one model row group were measured back to back.")
    return "\n".join(lines) + "\n"


def append_results(block: str, path: Path = RESULTS) -> None:
    """Insert ``block`` at the end of our section (created at the end of the file if absent); nothing else moves."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in text:
        path.write_text(text.rstrip("\n") + f"\n\n{SECTION}\n\n" + block)
        return
    start = text.index(SECTION) + len(SECTION)
    nxt = text.find("\n## ", start)
    if nxt < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + block)
    else:
        path.write_text(text[:nxt].rstrip("\n") + "\n\n" + block + text[nxt:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small,demo", help="comma-separated: small, demo")
    p.add_argument("--quick", action="store_true", help="fewer runs and tokens (~2 min with given artifacts)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--doc-chunks", type=int, default=4, help="memorized chunks of max_chunk tokens")
    p.add_argument("--artifact-small", default=None, help="reuse an exported small artifact")
    p.add_argument("--artifact-demo", default=None, help="reuse an exported demo artifact")
    p.add_argument("--quant", nargs="*", default=[], metavar="DIR", help="int8 / int4 artifacts (mplus-export --int8/--int4)")
    p.add_argument("--no-write", action="store_true", help="print the markdown, do not append to bench/RESULTS.md")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in ("small", "demo")]
    if bad:
        p.error(f"--models: unknown {bad}; use small and/or demo")
    if a.quick:
        a.runs, a.new, a.doc_chunks, a.prompt = 2, 16, 2, min(a.prompt, 64)

    import torch

    from mplus_deploy.profiling.profiler import machine_info
    from mplus_deploy.profiling.timing import measure_bandwidth

    torch.set_num_threads(a.threads)
    mach, bw = machine_info(), measure_bandwidth()
    notes, results = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        for name in a.models:
            results.append(run_model(name, a, Path(tmp), notes))
    block = markdown(results, notes, mach, bw, a)
    print(block)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not a.no_write:
        append_results(block)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
