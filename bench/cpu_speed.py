"""Issue 16's CPU workload, the reference (the official-style direct path) against ``Engine`` (ONNX Runtime),
each variant in its own process (peak RSS per variant), interleaved rounds, medians of per-round ratios.

The configuration (issue 16): 4 layers, d 256, 8/2 heads (head_dim 32), SwiGLU 704, vocab 2048, K 64, N 1024,
K0 256, LTM 16,384 rows per layer with distinct ages, update_ltm_frequency 10; memorize 512-token chunks (10 per
merge cycle); queries on the fresh state at T=64 and T=512 (prefill + the first token); decode of 32 tokens after
a 64-token prompt; fp32, 2 threads.

    python bench/cpu_speed.py [--rounds 5] [--chunks 20] [--write]      # all variants, table (+ RESULTS.md)
    python bench/cpu_speed.py --variant engine --art DIR --json F       # one variant (the driver calls this)

Memorize is split into graph time (``TimedRunner``: memory_update, memory_project) and host time (the rest of
``Session.memorize``: bookkeeping, feeds, Python).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LTM_ROWS = 16384
PROMPTS = (64, 512)
DECODE_PROMPT, DECODE_NEW = 64, 32


def config():
    from mplus_deploy.model import preset

    return preset("small").replace(
        vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_tokens=64, num_blocks=20, num_ltm_blocks=4, update_ltm_frequency=10,
        ltm_initial_size=LTM_ROWS, max_chunk=512, max_window=1024, max_position_embeddings=16384)


def model():
    import torch

    from mplus_deploy.model import MPlus

    cfg = config()
    m = MPlus.from_config(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    for l in range(cfg.num_hidden_layers):  # distinct ages (from_config draws them with ties)
        m.memory.ltm_ages[l] = torch.randperm(LTM_ROWS, generator=g).to(torch.float64)
    m.memory.touch()
    return m


def _ids(n: int, seed: int):
    import torch

    return torch.randint(3, config().vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ one variant
class Reference:
    def __init__(self):
        self.m = model()
        self.init = self.m.memory.clone()

    def reset(self):
        self.m.memory = self.init.clone()
        self.m.memory.seed(0)

    def memorize(self, doc):
        self.m.inject(doc)
        return None

    def generate(self, ids, n):
        return self.m.generate(ids, n, stop_at_eos=False)


class EngineVariant:
    def __init__(self, art: str, threads: int, attention: str = "gqa"):
        from mplus_deploy.profiling.timing import TimedRunner
        from mplus_deploy.runtime import Engine

        self.eng = Engine(art, backend="onnxruntime", threads=threads, seed=0, wrap=TimedRunner, attention=attention)
        self.timed = self.eng.runner
        self.sess = self.eng.session(seed=0)

    def reset(self):  # the session's own copy of the initial memory is made here, as Reference.reset clones its
        self.sess = self.eng.session(seed=0)  # memory: neither variant's memorize timing includes that copy
        self.sess.memory  # noqa: B018 (materializes the lazily copied memory)

    def memorize(self, doc):
        mark = self.timed.mark()
        self.sess.memorize(doc, chunk_size=512, progress=False)
        return {g: self.timed.total(mark, g) for g in ("memory_update", "memory_update_short", "memory_project")}

    def generate(self, ids, n):
        return self.sess.generate_ids(ids, n, stop_at_eos=False)


def score_floor_ms(T: int, reps: int = 7) -> dict:
    """The query's unavoidable fp32 arithmetic: per layer ``sigmoid(q @ keys^T).mean(0)`` over the LTM's rows
    (spec §6.2), 4 layers, at torch's fastest (one GEMM per layer, oneDNN/MKL), median ms. Only the score GEMM
    and its sigmoid, no prefill, no top-k."""
    import torch

    cfg = config()
    g = torch.Generator().manual_seed(0)
    L, dr = cfg.num_hidden_layers, cfg.selector_hidden_dim
    q = [torch.randn(T, dr, generator=g) for _ in range(L)]
    keys = [torch.randn(LTM_ROWS, dr, generator=g) for _ in range(L)]
    out = {}
    for name, fn in (("gemm", lambda a, b: a @ b.T), ("score", lambda a, b: torch.sigmoid(a @ b.T).mean(0))):
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for a, b in zip(q, keys):
                fn(a, b)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts[1:]) * 1e3
    out["gflop"] = 2 * L * T * LTM_ROWS * dr / 1e9
    return out


def run_variant(kind: str, art: str | None, threads: int, chunks: int, reps: int, attention: str = "gqa") -> dict:
    import torch

    from mplus_deploy.util.machine import peak_rss_gib

    torch.set_num_threads(threads)
    v = Reference() if kind == "reference" else EngineVariant(art, threads, attention)
    doc = _ids(chunks * 512, 11)
    v.reset()
    v.memorize(doc[:512])  # warm-up
    mem, graphs = [], []
    for _ in range(reps):
        v.reset()
        t0 = time.perf_counter()
        g = v.memorize(doc)
        mem.append(time.perf_counter() - t0)
        graphs.append(sum(g.values()) if g else None)
    v.reset()  # queries on the fresh state
    out = {"kind": kind, "memorize_s": statistics.median(mem), "memorize_tok_s": doc.numel() / statistics.median(mem)}
    if graphs[0] is not None:
        gs = statistics.median(graphs)
        out["memorize_graph_s"], out["memorize_host_share"] = gs, 1 - gs / statistics.median(mem)
    for T in PROMPTS:
        ids = _ids(T, 20 + T)
        v.generate(ids, 1)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            v.generate(ids, 1)
            ts.append(time.perf_counter() - t0)
        out[f"query_{T}_ms"] = statistics.median(ts) * 1e3
    ids = _ids(DECODE_PROMPT, 7)
    one, full, toks = [], [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        v.generate(ids, 1)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        toks = v.generate(ids, DECODE_NEW + 1)
        full.append(time.perf_counter() - t0)
    out["decode_tok_s"] = DECODE_NEW / max(statistics.median(full) - statistics.median(one), 1e-9)
    out["tokens"] = [int(t) for t in toks]
    out["peak_rss_mib"] = peak_rss_gib() * 1024
    out["score_floor"] = {T: score_floor_ms(T) for T in PROMPTS}  # after the peak: it allocates nothing lasting
    return out


# ------------------------------------------------------------------------------------ driver
def _child(kind: str, art: str, a) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--variant", kind, "--art", art, "--json", path, "--threads", str(a.threads),
           "--chunks", str(a.chunks), "--reps", str(a.reps), "--attention", a.attention]
    subprocess.run(cmd, check=True, env={**os.environ, "MPLUS_PROGRESS": "0"})
    r = json.loads(Path(path).read_text())
    os.unlink(path)
    return r


def markdown(rows: dict, a, mach: dict) -> str:
    ref, eng = rows["reference"], rows["engine"]
    med = lambda k, v: statistics.median(r[k] for r in v)  # noqa: E731
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/cpu_speed.py --rounds {a.rounds} --chunks {a.chunks}`", "",
             f"Machine: {mach['cpu']} ({mach['flags']}), {a.threads} threads, fp32. Issue 16's configuration; each variant "
             f"in its own process, {a.rounds} interleaved rounds of {a.reps} repetitions, medians. Reference = `MPlus` "
             "direct path (the official code's math and order). Ratio = the median over rounds of each round's "
             "ratio (a round's two processes run back to back, so a drift of the machine between rounds cancels); "
             "range = the rounds' lowest and highest ratio.", "",
             "| metric | reference | Engine (ORT) | ratio | range |", "| --- | --- | --- | --- | --- |"]
    for k, name, hi in (("memorize_tok_s", "memorize tok/s", True), ("query_64_ms", "query T=64 ms", False),
                        ("query_512_ms", "query T=512 ms", False), ("decode_tok_s", "decode tok/s", True),
                        ("peak_rss_mib", "peak RSS MiB", False)):
        r, e = med(k, ref), med(k, eng)
        paired = [(y[k] / x[k] if hi else x[k] / y[k]) for x, y in zip(ref, eng)]
        lines.append(f"| {name} | {r:,.1f} | {e:,.1f} | {statistics.median(paired):.2f}x | "
                     f"{min(paired):.2f}-{max(paired):.2f}x |")
    lines.append(f"| host share of Engine memorize | | {med('memorize_host_share', eng):.1%} | | |")
    same = all(x["tokens"] == ref[0]["tokens"] for x in eng)
    lines += ["", f"Greedy decode tokens equal the reference's: {'yes' if same else 'NO'}.", ""]
    for T in PROMPTS:
        fl = [r["score_floor"][str(T)] for r in ref + eng]
        g, sc, gf = (statistics.median(f[k] for f in fl) for k in ("gemm", "score", "gflop"))
        lines.append(f"Query T={T} floor: the retrieval scores alone (4 layers of `sigmoid(q @ keys^T).mean(0)` over "
                     f"{LTM_ROWS:,} rows, {gf:.2f} GFLOP, torch fp32) take {sc:.1f} ms ({g:.1f} ms of it the GEMM, "
                     f"{gf / g * 1e3:.0f} GFLOP/s); 3x the reference is {med(f'query_{T}_ms', ref) / 3:.1f} ms.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["reference", "engine"])
    p.add_argument("--art")
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", choices=["gqa", "graph"], default="gqa",
                   help="the Engine's decode attention (runtime/backends/ort_gqa.py; default the runtime's)")
    p.add_argument("--chunks", type=int, default=20, help="512-token chunks memorized per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args(argv)
    if a.variant:
        Path(a.json).write_text(json.dumps(run_variant(a.variant, a.art, a.threads, a.chunks, a.reps, a.attention)))
        return 0
    import warnings

    from mplus_deploy.build import export_artifact
    from mplus_deploy.util.machine import cpu_name

    warnings.simplefilter("ignore")
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    mach = {"cpu": cpu_name(), "flags": flags}
    with tempfile.TemporaryDirectory() as tmp:
        art = str(Path(tmp) / "art")
        export_artifact(model(), art, validate=False, source={"bench": "cpu_speed"})
        rows = {"reference": [], "engine": []}
        for i in range(a.rounds):
            for kind in ("reference", "engine") if i % 2 == 0 else ("engine", "reference"):
                r = _child(kind, art, a)
                rows[kind].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
    from _results import publish

    publish(markdown(rows, a, mach), a.write, "## Issue 16: CPU speed on its configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
