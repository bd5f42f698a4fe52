"""CPU benchmark: naive retrieval scoring (whole [T, S] matrix) vs the chunked fast path (exact) and the
opt-in bf16 prefilter (eager, and with the TorchInductor-fused sigmoid/mean; compile time not timed).

Each (method, T, S) case runs in its own subprocess so its peak RSS (VmHWM) is its own; the peak
reported is VmHWM minus the high-water mark right after the inputs were created (for the TorchInductor
variant, the mark is reset with /proc/self/clear_refs after the one-time compile, so the compiler's own
memory is not counted). Times are the
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


def _reset_hwm_kb() -> int:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _hwm_kb()


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
    elif method in ("bf16", "bf16c"):
        from mplus_deploy.plugins.cpu import bf16_keys, topk_retrieve_bf16

        t0 = time.perf_counter()
        kb = bf16_keys(keys)  # the bf16 index: built once per memory state, counted in the peak, not in the time
        build_s = time.perf_counter() - t0
        fn = lambda: topk_retrieve_bf16(q, keys, S, ages, K, compiled=method == "bf16c", keys_bf16=kb)  # noqa: E731
        if method == "bf16c":
            fn()  # TorchInductor compiles once (not timed)
            base = _reset_hwm_kb() - kb.numel() * 2 // 1024  # the index still counts in the peak
    else:
        fn = lambda: topk_retrieve_chunked(q, keys, S, ages, K)  # noqa: E731
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    peak = _hwm_kb() - base
    same = None
    if method != "naive" and T * S <= 2048 * 163840:
        same = bool(torch.equal(out, topk_retrieve(q, keys, S, ages, K)))
    res = {"median_s": statistics.median(times), "peak_mb": max(peak, 0) / 1024, "same_as_reference": same}
    if method.startswith("bf16"):
        res["index_build_s"] = build_s
    return res


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
        bc = run_case("bf16c", T, S, a.runs, a.threads)
        rows.append((T, S, n, c, b, bc))
        print(f"T={T} S={S}: naive {n['median_s']:.3f}s {n['peak_mb']:.0f}MB | chunked {c['median_s']:.3f}s "
              f"{c['peak_mb']:.0f}MB", file=sys.stderr)
    lines = [
        f"Machine: {machine()}; threads={a.threads}; dk={DK}, k={K}; median of {a.runs} runs; fp32. "
        "Peak = VmHWM above the high-water mark after creating inputs (one subprocess per case). "
        "bf16 prefilter: `topk_retrieve_bf16` (oversample 2, chunk 8192) with a prebuilt bf16 copy of the keys "
        "(its build time is listed below, once per memory state; its 84 MB at S=160k count in the peak).",
        "",
        "| T | S | naive s | chunked s (exact) | speed-up | bf16 prefilter s (opt-in) | speed-up | + inductor s | speed-up "
        "| peak MB naive / chunked / bf16 / bf16+ind | memory ratio naive/chunked, naive/bf16+ind | == reference (chunked, bf16, bf16+ind) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for T, S, n, c, b, bc in rows:
        ratio = n["peak_mb"] / max(c["peak_mb"], 0.5)
        lines.append(f"| {T} | {S} | {n['median_s']:.3f} | {c['median_s']:.3f} | {n['median_s'] / c['median_s']:.2f}x | "
                     f"{b['median_s']:.3f} | {n['median_s'] / b['median_s']:.2f}x | {bc['median_s']:.3f} | "
                     f"{n['median_s'] / bc['median_s']:.2f}x | {n['peak_mb']:.0f} / {c['peak_mb']:.1f} / {b['peak_mb']:.1f} / "
                     f"{bc['peak_mb']:.1f} | {'≥' if c['peak_mb'] < 0.5 else ''}{ratio:.0f}x, "
                     f"{n['peak_mb'] / max(bc['peak_mb'], 0.5):.0f}x | "
                     f"{c['same_as_reference']}, {b['same_as_reference']}, {bc['same_as_reference']} |")
    lines.append("")
    lines.append("bf16 index build (`bf16_keys`, once per memory state): " + ", ".join(
        f"S={S}: {b['index_build_s'] * 1e3:.0f} ms" for T, S, n, c, b, bc in rows))
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        res = ROOT / "bench" / "RESULTS.md"
        head = "" if res.exists() else "# Benchmark results\n"
        with open(res, "a") as f:
            f.write(f"{head}\n## Retrieval (CPU)\n\n{time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n")


if __name__ == "__main__":
    main()
