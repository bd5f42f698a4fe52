"""Simulated top-1 agreement of fp8 / int8 / int4 on the torch reference, per smoothing alpha (docs/quantization.md).

    python bench/quant_sim.py                         # demo, the sweep in docs/quantization.md
    python bench/quant_sim.py --modes int8 --alphas none,0.7 --texts 8

Uses ``calibration.sensitivity.Simulator`` (ModelOpt's scheme, bit-exact weights) and ``calibration.smooth``:
activation statistics from ``--calib-texts`` built-in calibration texts, agreement on the first ``--texts`` of
them (memorize ``--tokens`` tokens, prefill them). Every layer quantized. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--modes", default="int8,int4,fp8")
    p.add_argument("--alphas", default="none,0.3,0.5,0.7,0.85,1.0")
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--calib-texts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args(argv)
    from mplus_deploy.calibration.data import encoder, load_texts
    from mplus_deploy.calibration.sensitivity import Simulator
    from mplus_deploy.calibration.smooth import prepare
    from mplus_deploy.model.presets import resolve

    model, tok = resolve(a.model)
    enc = encoder(tok, model.config.vocab_size)
    texts = load_texts("builtin", a.calib_texts)
    alphas = [None if x == "none" else float(x) for x in a.alphas.split(",")]
    rows = []
    for mode in a.modes.split(","):
        row = []
        for al in alphas:
            t0 = time.perf_counter()
            sm = prepare(model, enc, texts, al, a.tokens) if al is not None else None
            sim = Simulator(model, enc, texts[: a.texts], mode, max_tokens=a.tokens, prompt_len=a.tokens,
                            scales=sm["scales"] if sm else None, calib_texts=texts)
            row.append(sim.top1())
            print(f"{mode} alpha={al}: top-1 {row[-1]:.4f} ({sim.positions} positions, {time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        rows.append((mode, row))
    print("| mode | " + " | ".join("none" if x is None else str(x) for x in alphas) + " |")
    print("| --- | " + " | ".join("---" for _ in alphas) + " |")
    for mode, row in rows:
        print(f"| {mode} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
