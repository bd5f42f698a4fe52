"""CPU benchmark: naive retrieval scoring (whole [T, S] matrix) vs the chunked fast path.

Each (method, T, S) case runs in its own subprocess so its peak RSS (ru_maxrss) is its own; the peak
reported is ru_maxrss minus the high-water mark right after the inputs were created. Times are the
median of ``--runs`` runs of scores + top-k (k=2560) + age order. Prints a markdown table and appends
it to bench/RESULTS.md under "## Retrieval (CPU)".

    python bench/retrieval.py            # S in {16k, 64k, 160k} x T in {64, 512, 2048}
    python bench/retrieval.py --quick    # S=160k (T=64, 2048) and S=16k (T=512)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DK, K = 256, 2560


def _hwm_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(method: str, T: int, S: int, runs: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from mplus_deploy.plugins import exact_topk, topk_retrieve, topk_retrieve_chunked
    from mplus_deploy.plugins.cpu import naive_scores
    from mplus_deploy.plugins.reference import order_oldest_first

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(T, DK, generator=g), torch.randn(S, DK, generator=g)
    ages = torch.randint(0, 1000, (S,), generator=g)
    base = _hwm_kb()
    if method == "naive":
        fn = lambda: order_oldest_first(exact_topk(naive_scores(q, keys), K), ages)  # noqa: E731
    elif method == "bf16":
        from mplus_deploy.plugins.cpu import topk_retrieve_bf16

        fn = lambda: topk_retrieve_bf16(q, keys, S, ages, K)  # noqa: E731
    else:
        fn = lambda: topk_retrieve_chunked(q, keys, S, ages, K)  # noqa: E731
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    same = None
    if method in ("chunked", "bf16") and T * S <= 2048 * 163840:
        same = bool(torch.equal(out, topk_retrieve(q, keys, S, ages, K)))
    return {"median_s": statistics.median(times), "peak_mb": max(peak, 0) / 1024, "same_as_reference": same}


def run_case(method, T, S, runs, threads):
    p = subprocess.run([sys.executable, __file__, "--child", method, str(T), str(S), str(runs), str(threads)],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        m, T, S, r, th = a.child
        print(json.dumps(child(m, int(T), int(S), int(r), int(th))))
        return
    cases = [(2048, 163840), (64, 163840), (512, 16384)] if a.quick else \
        [(T, S) for S in (16384, 65536, 163840) for T in (64, 512, 2048)]
    rows = []
    for T, S in cases:
        n = run_case("naive", T, S, a.runs, a.threads)
        c = run_case("chunked", T, S, a.runs, a.threads)
        b = run_case("bf16", T, S, a.runs, a.threads)
        rows.append((T, S, n, c, b))
        print(f"T={T} S={S}: naive {n['median_s']:.3f}s {n['peak_mb']:.0f}MB | chunked {c['median_s']:.3f}s "
              f"{c['peak_mb']:.0f}MB", file=sys.stderr)
    lines = [
        f"Machine: {machine()}; threads={a.threads}; dk={DK}, k={K}; median of {a.runs} runs; fp32. "
        "Peak = ru_maxrss above the high-water mark after creating inputs (one subprocess per case).",
        "",
        "| T | S | naive s | chunked s | speed-up | naive peak MB | chunked peak MB | memory ratio | chunked == reference "
        "| bf16 prefilter s (opt-in) | speed-up | bf16 peak MB | bf16 == reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for T, S, n, c, b in rows:
        ratio = n["peak_mb"] / max(c["peak_mb"], 0.5)
        lines.append(f"| {T} | {S} | {n['median_s']:.3f} | {c['median_s']:.3f} | {n['median_s'] / c['median_s']:.2f}x | "
                     f"{n['peak_mb']:.0f} | {c['peak_mb']:.1f} | {'≥' if c['peak_mb'] < 0.5 else ''}{ratio:.0f}x | "
                     f"{c['same_as_reference']} | {b['median_s']:.3f} | {n['median_s'] / b['median_s']:.2f}x | "
                     f"{b['peak_mb']:.1f} | {b['same_as_reference']} |")
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        res = ROOT / "bench" / "RESULTS.md"
        head = "" if res.exists() else "# Benchmark results\n"
        with open(res, "a") as f:
            f.write(f"{head}\n## Retrieval (CPU)\n\n{time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n")


if __name__ == "__main__":
    main()
