"""Where one ORT decode step spends its time: ONNX Runtime's profiler, kernel time per op type.

    python bench/decode_profile.py OUT [--graph graphs/decode.onnx] [--cache 705] [--steps 6] [--wall 20]

Runs the artifact's decode graph (or ``--graph``, e.g. ``graphs/decode.int4.onnx``) on random inputs with a
KV cache of ``--cache`` rows in all (timings do not depend on the values) and prints ms per step per op type,
plus the share of the KV-cache copies (nodes that write a cache-sized tensor). Reads both decode contracts: format v2
(per layer ``prefix_k.{l}`` [Hkv, P, Dh] + tail ``past_k.{l}`` [Hkv, cache - P, Dh]) and the stacked
``past_k`` [L, Hkv, cache, Dh] of format v1 artifacts, so a before/after comparison runs the same script.
``--wall N`` also times N unprofiled steps (median wall ms/step, IOBinding, cache bound as OrtValues).
Used for the decode profile in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def feeds(shapes: dict, cache: int) -> dict:
    """Random decode feeds for a cache of ``cache`` rows (prefix included) in either contract."""
    rng = np.random.default_rng(0)
    f = {"ids": np.array([42], np.int64), "pos": np.array(cache, np.int64)}
    if "past_k" in shapes:  # format v1: stacked [L, Hkv, C, Dh]
        L, H, _, D = shapes["past_k"]
        for n in ("past_k", "past_v"):
            f[n] = rng.standard_normal((L, H, cache, D)).astype(np.float32)
        return f
    P = shapes["prefix_k.0"][1]
    if cache <= P:
        raise SystemExit(f"--cache {cache} must exceed the memory prefix P = {P}")
    for n, shape in shapes.items():
        if n.startswith(("prefix_", "past_")):
            H, _, D = shape
            rows = P if n.startswith("prefix_") else cache - P
            f[n] = rng.standard_normal((H, rows, D)).astype(np.float32)
    return f


def session(path: Path, threads: int, profile: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mplus_decode_profile")
    off = ["MatMulAddFusion"] if ".int4." in path.name else []
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)


def wall_ms(path: Path, threads: int, cache: int, steps: int) -> float:
    """Median wall ms of ``steps`` decode calls; inputs bound once as CPU OrtValues (the runtime's binding)."""
    import onnxruntime as ort

    s = session(path, threads, False)
    f = feeds({i.name: i.shape for i in s.get_inputs()}, cache)
    io = s.io_binding()
    vals = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in f.items()}
    for n, v in vals.items():
        io.bind_ortvalue_input(n, v)
    for o in s.get_outputs():
        io.bind_output(o.name, "cpu")
    s.run_with_iobinding(io)  # warm-up
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        s.run_with_iobinding(io)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--graph", default="graphs/decode.onnx")
    p.add_argument("--cache", type=int, default=705, help="cache rows in all (memory prefix + prompt + tokens)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--wall", type=int, default=0, help="also time this many unprofiled steps (median)")
    a = p.parse_args(argv)

    path = a.out / a.graph
    s = session(path, a.threads, True)
    feed = feeds({i.name: i.shape for i in s.get_inputs()}, a.cache)
    s.run(None, feed)  # warm-up (also profiled; subtracted below)
    for _ in range(a.steps):
        s.run(None, feed)
    prof = s.end_profiling()
    del s
    events = json.load(open(prof))
    os.remove(prof)
    runs = [e for e in events if e.get("name") == "model_run"]
    t_warm = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    # KV-cache copies: nodes other than the attention products that write a cache-sized [..., rows, Dh] tensor
    # (rows >= the tail length: v1 Split/Concat/stack of the whole cache, v2 the Concat that grows the tail)
    shapes = {i.name: i.shape for i in session(path, a.threads, False).get_inputs()}
    Dh = (shapes.get("past_k") or shapes["past_k.0"])[-1]
    rows = a.cache if "past_k" in shapes else a.cache - shapes["prefix_k.0"][1]
    by, n, cp, ncp = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t_warm:
            op = e["args"]["op_name"]
            by[op] += e["dur"]
            n[op] += 1
            outs = [next(iter(o.values())) for o in e["args"].get("output_type_shape", [])]
            if op not in ("MatMul", "FusedMatMul", "Gemm") and any(len(o) >= 3 and o[-1] == Dh and o[-2] >= rows for o in outs):
                cp[op] += e["dur"]
                ncp[op] += 1
    total = sum(by.values()) / a.steps / 1e3
    contract = "v1 stacked past_k/past_v" if "past_k" in feed else "v2 per-layer prefix + tail"
    print(f"{path}: cache {a.cache} rows ({contract}), {a.threads} threads, {a.steps} steps; kernel time {total:.2f} ms/step")
    print("| op | ms/step | nodes | share |\n| --- | --- | --- | --- |")
    for op, d in by.most_common(12):
        ms = d / a.steps / 1e3
        print(f"| {op} | {ms:.2f} | {n[op] // a.steps} | {100 * ms / total:.0f} % |")
    kv = sum(cp.values()) / a.steps / 1e3
    what = ", ".join(f"{ncp[op] // a.steps} {op}" for op in sorted(cp))
    print(f"KV-cache copies (nodes writing a [.., >= {rows}, {Dh}] tensor: {what}): {kv:.2f} ms/step ({100 * kv / total:.0f} %)")
    if a.wall:
        print(f"wall: {wall_ms(path, a.threads, a.cache, a.wall):.2f} ms/step (median of {a.wall}, IOBinding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
