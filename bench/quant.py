"""CPU benchmark: INT8 / INT4 decode and prefill latency in onnxruntime vs fp32, with top-1 agreement.

For each model (``small``, ``demo``): export fp32 (or reuse ``--art-dir/<model>``), quantize int8 and int4
with the built-in calibration corpus (int4: RTN) (``mplus_deploy.calibration.quantize_artifact``, report included),
capture held-out prefill/decode inputs through the fp32 composition, then time single graph runs:

- ``prefill``: one prompt of T tokens (held-out text) over the real memory prefix;
- ``decode``: one step over a KV cache of ``prefix + T`` rows.

Variants: fp32 at ORT_ENABLE_ALL (baseline); int8 and int4 at ORT_ENABLE_BASIC (the validated Q/DQ
graph as is) and at ORT_ENABLE_ALL (int8 → MatMulIntegerToFloat, int4 → MatMulNBits; accuracy level 4 =
ORT default, and level 1 = exact fp32 compute). Each variant reports its top-1 agreement with fp32 on the
held-out prefill positions / decode steps it ran. Times: median of ``--runs``. Appends a markdown table
to bench/RESULTS.md under "## Quantization (CPU)".

    python bench/quant.py                    # small + demo
    python bench/quant.py --models small --runs 10 --no-append
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _cpu() -> str:
    from mplus_deploy.util.machine import cpu_name

    return cpu_name()


def ensure_artifact(name: str, art_dir: Path, modes: list[str], progress: bool) -> Path:
    import json

    out = art_dir / name
    if not (out / "manifest.json").exists():
        from mplus_deploy.build import export_artifact
        from mplus_deploy.export.exporter import prepare_out
        from mplus_deploy.model.presets import resolve

        model, tok = resolve(name)
        prepare_out(out, overwrite=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_artifact(model, out, tokenizer=tok, validate=False, source={"preset": name})
        del model
    from mplus_deploy.calibration import quantize_artifact

    for mode in modes:
        m = json.loads((out / "manifest.json").read_text())
        if mode not in m.get("quantized", {}):
            print(f"[{name}] quantize {mode} ...", flush=True)
            quantize_artifact(out, mode, "builtin", progress=progress, print_table=True)
    return out


def time_it(fn, runs: int) -> float:
    from mplus_deploy.util.machine import median_time

    return median_time(fn, runs, warmup=1)


def bench_model(name: str, out: Path, runs: int, threads: int, n_eval: int, progress: bool) -> list[dict]:
    import json

    import onnxruntime as ort

    from mplus_deploy.calibration.capture import capture
    from mplus_deploy.calibration.data import encoder, heldout_texts, load_artifact_tokenizer, load_texts
    from mplus_deploy.model.config import MPlusConfig

    man = json.loads((out / "manifest.json").read_text())
    cfg = MPlusConfig.from_dict(man["config"])
    enc = encoder(load_artifact_tokenizer(out), cfg.vocab_size)
    texts = heldout_texts(load_texts("builtin"))[:n_eval]
    cap = capture(out, texts, enc, max_tokens=128, n_decode=8, max_per_graph=64, seed=7, progress=progress, desc=f"{name} held-out")
    pre, dec = cap["feeds"]["prefill"], cap["feeds"]["decode"]
    # timing inputs: the longest held-out prompt, a decode step with the longest cache
    pre_t = max(pre, key=lambda f: f["ids"].shape[0])
    def cache_rows(f) -> int:  # memory prefix + tail (decode contract v2: per-layer prefix_k.{l} + past_k.{l})
        return int(f["prefix_k.0"].shape[1] + f["past_k.0"].shape[1])

    dec_t = max(dec, key=cache_rows)

    def sess(path, level, mode=None, **cfg_entries):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        for k, v in cfg_entries.items():
            so.add_session_config_entry(k, v)
        # MatMulAddFusion would turn decode's 2-D DQ->MatMul(+LoRA Add) into Gemm and block MatMulNBits
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["MatMulAddFusion"] if mode == "int4" else [])

    variants = [("fp32", "all", {}, None)]
    q = man.get("quantized", {})
    if "int8" in q:
        variants += [("int8", "basic", {}, "int8"), ("int8", "all", {}, "int8")]
    if "int4" in q:
        variants += [("int4", "basic", {}, "int4"), ("int4", "all", {}, "int4")]
        if q["int4"]["calibration"].get("method") != "rtn_asym":  # rtn_asym: the level is a MatMulNBits attribute
            variants += [("int4", "all", {"session.qdq_matmulnbits_accuracy_level": "1"}, "int4")]
    rows, base = [], {}
    ref_logits = {}
    for label, level, extra, mode in variants:
        meth = q[mode]["calibration"].get("method") if mode else None
        res = {"model": name, "variant": label + (f" ({meth})" if meth else ""), "ort": level.upper() + ("" if not extra else " acc=1"),
               "threads": threads}
        for g, feeds, tf in (("prefill", pre, pre_t), ("decode", dec, dec_t)):
            path = out / (q[mode]["graphs"][g]["file"] if mode and g in q[mode]["graphs"] and "file" in q[mode]["graphs"][g]
                          else man["graphs"][g]["file"])
            s = sess(path, level, mode, **extra)
            names = ["logits"]
            lg = [s.run(names, f)[0] for f in feeds]
            if label == "fp32":
                ref_logits[g] = lg
                agree = 1.0
            else:
                a = np.concatenate([x.argmax(-1) for x in ref_logits[g]])
                b = np.concatenate([x.argmax(-1) for x in lg])
                agree = float((a == b).mean())
            t = time_it(lambda: s.run(names, tf), runs)
            if label == "fp32":
                base[g] = t
            res[f"{g}_ms"] = 1e3 * t
            res[f"{g}_speedup"] = base[g] / t
            res[f"{g}_top1"] = agree
            res[f"{g}_n"] = int(sum(x.shape[0] for x in lg))
            del s
        res["T"] = int(pre_t["ids"].shape[0])
        res["C"] = cache_rows(dec_t)
        rows.append(res)
        print(f"[{name}] {res['variant']:14s} {res['ort']:10s} prefill {res['prefill_ms']:8.2f} ms ({res['prefill_speedup']:.2f}x, "
              f"top1 {res['prefill_top1']:.4f}/{res['prefill_n']})  decode {res['decode_ms']:7.2f} ms "
              f"({res['decode_speedup']:.2f}x, top1 {res['decode_top1']:.4f}/{res['decode_n']})", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    L = ["| model | variant | ORT level | prefill ms (T) | speed-up | top-1 (positions) | decode ms (cache C) | speed-up | top-1 (steps) |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        L.append(f"| {r['model']} | {r['variant']} | {r['ort']} | {r['prefill_ms']:.2f} (T={r['T']}) | {r['prefill_speedup']:.2f}x | "
                 f"{r['prefill_top1']:.4f} ({r['prefill_n']}) | {r['decode_ms']:.2f} (C={r['C']}) | {r['decode_speedup']:.2f}x | "
                 f"{r['decode_top1']:.4f} ({r['decode_n']}) |")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "demo"])
    p.add_argument("--art-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mplus_quant_bench")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--eval-texts", type=int, default=12)
    p.add_argument("--modes", default="int8,int4", help="quantized modes to bench (quantized with defaults if missing)")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for name in a.models:
        out = ensure_artifact(name, a.art_dir, a.modes.split(","), progress=sys.stderr.isatty())
        rows += bench_model(name, out, a.runs, a.threads, a.eval_texts, sys.stderr.isatty())
    import onnxruntime

    md = table(rows)
    print(md)
    if not a.no_append:
        head = (f"\n## Quantization (CPU)\n\n{time.strftime('%Y-%m-%d %H:%M')}\n\n"
                f"Machine: {_cpu()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, Python "
                f"{platform.python_version()}; intra-op threads={a.threads}; median of {a.runs} runs after one warm-up; "
                "single graph runs (prefill over the real memory prefix, one decode step). fp32 baseline at ORT_ENABLE_ALL. "
                "top-1 = argmax agreement with the fp32 graph on held-out inputs (positions / decode steps shown). "
                "Calibration: built-in corpus; method in parentheses (int4 = weight-only, block 32). "
                "int4 sessions run with disabled_optimizers=['MatMulAddFusion'] so MatMulNBits forms in decode.\n\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(head + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
