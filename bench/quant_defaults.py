"""Issue 21: the demo's default quantization modes as users call them (no scheme flag), timed with their
peak RSS, report verdict and the README answer. Each mode runs in a fresh `mplus-export` process
(`/usr/bin/time -v` for wall time and peak RSS), then `mplus-run OUT --quantized MODE` answers the README
prompt. Bounds printed: 4 min (fp8, int8) / 3 min (int4), 2 x checkpoint bytes + 1 GiB.

    python bench/quant_defaults.py [--modes fp8,int8,int4] [--dir /tmp/qd] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
LIMIT_S = {"fp8": 240, "int8": 240, "int4": 180}


def demo_weight_bytes() -> int:
    """The demo checkpoint's bytes (fp32 weights + memory), the '2 x checkpoint' reference."""
    from mplus_deploy.model.presets import resolve

    model, _ = resolve("demo")
    n = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return int(n)


def run_mode(mode: str, d: Path) -> dict:
    out = d / f"demo_{mode}"
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv/bin/mplus-export"), "demo", "-o", str(out), "--overwrite", f"--{mode}"]
    if mode != "int4":
        cmd += ["--calib", "builtin"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))) if wall else (0, 0, float("nan"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    res = {"mode": mode, "rc": r.returncode, "s": 3600 * h + 60 * m + s, "peak": rss,
           "log": [x for x in r.stderr.splitlines() if x.startswith("mplus-export:")][-6:]}
    man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    sec = (man.get("quantized") or {}).get(mode, {})
    res.update(scheme=sec.get("scheme"), report=sec.get("report"), timings=sec.get("timings"))
    if sec:
        ans = subprocess.run([str(ROOT / ".venv/bin/mplus-run"), str(out), "--quantized", mode, "--memorize",
                              str(ROOT / "docs/examples/fact.txt"), "--prompt", "The capital of France is",
                              "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT)
        res["answer"] = ans.stdout.strip()[-200:]
        res["answer_rc"] = ans.returncode
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="fp8,int8,int4")
    p.add_argument("--dir", default="/tmp/qd")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    ck = demo_weight_bytes()
    rows = []
    for mode in a.modes.split(","):
        print(f"[quant_defaults] {mode} ...", file=sys.stderr, flush=True)
        r = run_mode(mode, d)
        r["bound"] = 2 * ck + GIB
        r["limit_s"] = LIMIT_S[mode]
        rows.append(r)
        rep = r.get("report") or {}
        print(f"| {mode} | {r['scheme'] and r['scheme']['name']} | {r['s']:.0f} s (<= {LIMIT_S[mode]}) | "
              f"{r['peak'] / GIB:.2f} GiB (<= {r['bound'] / GIB:.2f}) | top-1 {rep.get('top1')} (target {rep.get('target_top1')}, "
              f"{'met' if rep.get('meets_target') else 'MISSED'}) | rc {r['rc']} | {r.get('answer')!r} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"checkpoint_bytes": ck, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
