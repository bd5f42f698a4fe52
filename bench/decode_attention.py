"""Decode with the exported attention (``attention="graph"``) against ORT's fused GroupQueryAttention over the
in-place KV buffer (``attention="gqa"``, the CPU default; runtime/backends/ort_gqa.py), in one process.

    python bench/decode_attention.py ART [--quantized int4] [--rounds 3] [--write]

Per variant and round: 2 greedy generations of 32 tokens after a 64-token prompt over the artifact's memory
prefix (the first step after prefill excluded), decode tok/s = 1 / median step; variants alternate, medians over
rounds. Also: greedy tokens equal between the variants, and the largest relative difference of the decode
logits before the first differing token.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NEW = 32


def run(eng, ids, log: list) -> tuple[list[int], float]:
    from mplus_deploy.model.sampling import SamplingParams
    from mplus_deploy.runtime.generate import token_stream

    log.clear()
    t, toks = [time.perf_counter()], []
    for tok in token_stream(eng.runner, eng.config.prefix_len, eng.host_memory.prefill_feeds(), ids,
                            SamplingParams(NEW, stop_at_eos=False)):
        t.append(time.perf_counter())
        toks.append(int(tok))
    return toks, statistics.median(b - a for a, b in zip(t[2:], t[3:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("art")
    p.add_argument("--quantized", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch

    from mplus_deploy.runtime import Engine
    from mplus_deploy.util.machine import cpu_name, rss_bytes

    torch.set_num_threads(a.threads)
    kw = {"quantized": a.quantized} if a.quantized else {}
    engines, logs = {}, {}
    for att in ("graph", "gqa"):
        e = Engine(a.art, backend="onnxruntime", threads=a.threads, seed=0, attention=att, **kw)
        logs[att] = []
        inner = e.runner.infer_impl

        def rec(g, f, k, inner=inner, log=logs[att]):
            out = inner(g, f, k)
            if g == "decode":
                log.append(out["logits"].clone())
            return out

        e.runner.infer_impl = rec
        engines[att] = e
    ids = torch.randint(100, engines["graph"].config.vocab_size - 100, (64,), generator=torch.Generator().manual_seed(0))
    same, worst = True, 0.0
    res = {k: [] for k in engines}
    for r in range(a.rounds):
        outs = {}
        for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            steps = []
            for _ in range(2):
                toks, s = run(engines[k], ids, logs[k])
                steps.append(s)
            outs[k] = toks
            res[k].append(1 / statistics.median(steps))
        ta, tb = outs["gqa"], outs["graph"]
        same &= ta == tb
        div = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        for x, y in list(zip(logs["gqa"], logs["graph"]))[: max(div - 1, 0)]:
            worst = max(worst, float((x - y).abs().max() / y.abs().max()))
        print({k: round(v[-1], 1) for k, v in res.items()}, "tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    what = f"int4 graphs (`{a.quantized}`)" if a.quantized else "fp32 graphs"
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/decode_attention.py ART"
             f"{' --quantized ' + a.quantized if a.quantized else ''} --rounds {a.rounds}`", "",
             f"Machine: {cpu_name()} ({flags}), {a.threads} threads. {Path(a.art).name}, {what}, 64-token prompt over "
             f"the {engines['graph'].config.prefix_len}-row memory prefix, {NEW} greedy tokens; {a.rounds} interleaved "
             "rounds of 2 generations, medians.", "",
             "| attention | decode tok/s | vs exported |", "| --- | --- | --- |"]
    for k, v in med.items():
        lines.append(f"| `{k}` | {v:.1f} | {v / med['graph']:.2f}x |")
    lines += ["", f"Greedy tokens equal: {'yes' if same else 'no'}; largest relative difference of the decode logits "
              f"before the first differing token: {worst:.2e}. Process RSS after the run: "
              f"{(rss_bytes() or 0) / 2**30:.2f} GiB (both engines).", ""]
    from _results import publish

    publish("\n".join(lines), a.write, "## Issue 16: CPU speed on its configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
