"""Where one ORT decode step spends its time: ONNX Runtime's profiler, kernel time per op type.

    python bench/decode_profile.py OUT [--graph graphs/decode.onnx] [--cache 705] [--steps 6]

Runs the artifact's decode graph (or ``--graph``, e.g. ``graphs/decode.int4.onnx``) on random inputs with a
KV cache of ``--cache`` rows (timings do not depend on the values) and prints ms per step per op type,
plus the share of the KV-cache ``Concat``/``Split`` copies. Used for the decode profile in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--graph", default="graphs/decode.onnx")
    p.add_argument("--cache", type=int, default=705)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    import onnxruntime as ort

    path = a.out / a.graph
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mplus_decode_profile")
    off = ["MatMulAddFusion"] if ".int4." in path.name else []
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)
    shape = {i.name: i.shape for i in s.get_inputs()}
    L, H, _, D = shape["past_k"]
    rng = np.random.default_rng(0)
    feed = {"ids": np.array([42], np.int64), "pos": np.array(a.cache, np.int64),
            "past_k": rng.standard_normal((L, H, a.cache, D)).astype(np.float32),
            "past_v": rng.standard_normal((L, H, a.cache, D)).astype(np.float32)}
    s.run(None, feed)  # warm-up (also profiled; subtracted below)
    for _ in range(a.steps):
        s.run(None, feed)
    prof = s.end_profiling()
    events = json.load(open(prof))
    os.remove(prof)
    runs = [e for e in events if e.get("name") == "model_run"]
    t_warm = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    by, n = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t_warm:
            by[e["args"]["op_name"]] += e["dur"]
            n[e["args"]["op_name"]] += 1
    total = sum(by.values()) / a.steps / 1e3
    print(f"{path}: cache {a.cache} rows, {a.threads} threads, {a.steps} steps; kernel time {total:.2f} ms/step")
    print("| op | ms/step | nodes | share |\n| --- | --- | --- | --- |")
    for op, d in by.most_common(12):
        ms = d / a.steps / 1e3
        print(f"| {op} | {ms:.2f} | {n[op] // a.steps} | {100 * ms / total:.0f} % |")
    kv = (by["Concat"] + by["Split"]) / a.steps / 1e3
    print(f"KV-cache Concat + Split: {kv:.2f} ms/step ({100 * kv / total:.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
