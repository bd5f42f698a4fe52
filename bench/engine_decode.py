"""Decode ms/token through the runtime: ``Engine(OUT)`` (fp32) vs ``Engine(OUT, quantized=MODE)``.

    python bench/engine_decode.py OUT [--quantized int4] [--threads 2] [--rounds 2] [--share-weights 0|1]

Greedy 33-token generations after a fixed 20-token prompt; per generation the median time between decode
steps (the first step after prefill excluded); per engine the median of 3 generations; engines alternate for
``--rounds`` rounds and the best round is kept. Numbers in bench/RESULTS.md ("session 3").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The history of the city goes back many centuries, and its old town is full of narrow streets where"


def step_ms(eng, n: int = 33) -> float:
    from mplus_deploy.model.sampling import SamplingParams
    from mplus_deploy.runtime.generate import token_stream

    ids = eng.codec.encode_prompt(PROMPT)
    feeds = eng.host_memory.prefill_feeds()
    t = [time.perf_counter()]
    for _ in token_stream(eng.runner, eng.config.prefix_len, feeds, ids, SamplingParams(n, stop_at_eos=False)):
        t.append(time.perf_counter())
    return 1e3 * statistics.median(b - a for a, b in zip(t[2:], t[3:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--quantized", default="int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--share-weights", type=int, default=1)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from mplus_deploy import runtime

    res: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for q in (None, a.quantized):
            eng = runtime.Engine(a.out, quantized=q, threads=a.threads, share_weights=bool(a.share_weights))
            eng.generate(PROMPT, max_new_tokens=4)  # warm-up
            ms = statistics.median(step_ms(eng) for _ in range(3))
            res.setdefault(q or "fp32", []).append(ms)
            print(f"{q or 'fp32'}: {ms:.2f} ms/token", flush=True)
            del eng
    best = {k: min(v) for k, v in res.items()}
    print(f"fp32 {best['fp32']:.2f} ms/token, {a.quantized} {best[a.quantized]:.2f} ms/token: "
          f"{best['fp32'] / best[a.quantized]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
