"""Paper scale (issue 13 item 6): export, load, memorize, query, decode and snapshot M+ at the real
mplus-8b width (d 4096, 32/8 heads, SwiGLU 14336, vocab 128256, N 10240, K0 2560) with 1-2 layers and a
large LTM, on random official-layout checkpoints (``mplus_deploy.model.synthetic``, docs/synthetic.md).

Every stage runs in a fresh child process so its peak RSS is its own (``ru_maxrss`` of the child, and
``VmHWM`` reset per phase through ``/proc/self/clear_refs``). Bounds printed next to each peak:
export <= 1.5 x checkpoint bytes + 1 GiB; engine phases <= 1.5 x (weights + memory bytes) + 1 GiB.

    python bench/scale.py --layers 1 --ltm-rows 16384 [--dir /tmp/scale] [--json out.json]
    python bench/scale.py --layers 2 --ltm-rows 150000 --merge-every 8     # crosses a merge in 4k tokens

``--merge-every F`` sets ``update_ltm_frequency`` in the checkpoint (real M+: 60 updates = 15,360 tokens)
so that memorizing 4,096 tokens (16 updates of 256 rows) crosses an LTM merge.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


class _Sampler:
    """Peak RSS of a phase: VmRSS sampled every 10 ms by a thread (VmHWM cannot be reset everywhere)."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.01)

    def reset(self):
        self.peak = self.rss()


_S = None


def _hwm_reset() -> None:
    global _S
    _S = _S or _Sampler()
    _S.reset()


def _hwm() -> int:
    if _S is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(_S.peak, _S.rss())


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), platform.processor())
    flags = next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))}


# ------------------------------------------------------------------------------------ stages (children)
def stage_ckpt(a) -> dict:
    from mplus_deploy.model.synthetic import write_synthetic

    t0 = time.perf_counter()
    over = {"update_ltm_frequency": a.merge_every} if a.merge_every else {}
    write_synthetic(a.ckpt, "mplus-8b", layers=a.layers, ltm_rows=a.ltm_rows, overwrite=True, **over)
    size = sum(p.stat().st_size for p in Path(a.ckpt).iterdir())
    return {"s": time.perf_counter() - t0, "bytes": size, "peak": _hwm()}


def stage_export(a) -> dict:
    from mplus_deploy.cli.export import main

    t0 = time.perf_counter()
    rc = main([a.ckpt, "-o", a.art, "--overwrite"])
    size = sum(p.stat().st_size for p in Path(a.ckpt).iterdir())
    return {"rc": rc, "s": time.perf_counter() - t0, "peak": _hwm(), "ckpt_bytes": size,
            "bound": 1.5 * size + GIB, "weights_bytes": (Path(a.art) / "graphs" / "weights.data").stat().st_size}


def stage_engine(a) -> dict:
    import torch

    from mplus_deploy import runtime

    out: dict = {}
    g = torch.Generator().manual_seed(0)
    vocab = 128256
    weights = (Path(a.art) / "graphs" / "weights.data").stat().st_size

    def phase(name, fn):
        _hwm_reset()
        t0 = time.perf_counter()
        r = fn()
        holder = eng if eng is not None else r  # the load phase: the engine it returns holds the memory it built
        mem = holder.host_memory.memory_bytes()["total"]
        out[name] = {"s": time.perf_counter() - t0, "peak": _hwm(), "memory_bytes": mem,
                     "bound": 1.5 * (weights + mem) + GIB}
        return r

    eng = None
    eng = phase("load", lambda: runtime.Engine(a.art, seed=0))
    ids = torch.randint(0, vocab, (a.memorize_tokens,), generator=g)
    st = phase("memorize", lambda: eng.memorize(ids, chunk_size=512, progress=False))
    out["memorize"].update(tok_s=a.memorize_tokens / out["memorize"]["s"], stats=st)
    for T in a.prompt_lens:
        p = torch.randint(0, vocab, (T,), generator=g)
        phase(f"query_T{T}", lambda p=p: eng.generate_ids(p, max_new_tokens=1))
    p = torch.randint(0, vocab, (64,), generator=g)
    n = a.new_tokens
    phase("generate_T64", lambda: eng.generate_ids(p, max_new_tokens=n))
    q = phase("query_T64_again", lambda: eng.generate_ids(p, max_new_tokens=1))  # noqa: F841
    out["decode_ms_per_token"] = 1e3 * (out["generate_T64"]["s"] - out["query_T64_again"]["s"]) / max(1, n - 1)
    snap = Path(a.dir) / "mem.safetensors"
    phase("snapshot_save", lambda: eng.save_memory(snap))
    out["snapshot_save"]["bytes"] = snap.stat().st_size
    phase("snapshot_load", lambda: eng.load_memory(snap))
    again = Path(a.dir) / "mem2.safetensors"  # exactness without holding a second memory: save again, compare bytes
    eng.save_memory(again)
    out["snapshot_roundtrip_exact"] = _sha(snap) == _sha(again)
    snap.unlink()
    again.unlink()
    return out


def _sha(p: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ driver
def run_child(stage: str, a) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--layers", str(a.layers), "--ltm-rows", str(a.ltm_rows),
           "--dir", a.dir, "--memorize-tokens", str(a.memorize_tokens), "--new-tokens", str(a.new_tokens),
           "--prompt-lens", ",".join(map(str, a.prompt_lens))] + (["--merge-every", str(a.merge_every)] if a.merge_every else [])
    print(f"[scale] {stage} ...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["child_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return res


def markdown(res: dict) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"L={res['layers']}, LTM {res['ltm_rows']} rows/layer, {res['cpu']['model']} ({res['cpu']['cores']} cores; "
             f"{' '.join(res['cpu']['flags'])})", "",
             "| stage | time | peak RSS GiB | bound GiB | notes |", "| --- | --- | --- | --- | --- |"]
    c, e = res["ckpt"], res["export"]
    lines.append(f"| synthetic checkpoint | {c['s']:.0f} s | {g(c['peak'])} | - | {g(c['bytes'])} GiB on disk |")
    lines.append(f"| mplus-export (bf16, validated) | {e['s']:.0f} s | {g(e['peak'])} | {g(e['bound'])} | weights.data {g(e['weights_bytes'])} GiB |")
    for k, v in res["engine"].items():
        if not isinstance(v, dict):
            continue
        note = ""
        if k == "memorize":
            note = f"{v['tok_s']:.0f} tok/s, LTM rows {v['stats'].get('ltm_rows')}, pending {v['stats'].get('pending_rows')}"
        if k == "snapshot_save":
            note = f"{g(v['bytes'])} GiB file"
        if k == "snapshot_load":
            note = f"round trip exact: {res['engine']['snapshot_roundtrip_exact']}"
        lines.append(f"| {k} | {v['s']:.2f} s | {g(v['peak'])} | {g(v['bound'])} | memory {g(v['memory_bytes'])} GiB {note} |")
    lines.append(f"| decode | {res['engine']['decode_ms_per_token']:.0f} ms/token | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--ltm-rows", type=int, default=16384)
    p.add_argument("--merge-every", type=int, default=None)
    p.add_argument("--memorize-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=9)
    p.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[64, 512, 2047])  # 2047 + 1 new token = the 2,048 window
    p.add_argument("--dir", default="/tmp/scale")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and artifact")
    p.add_argument("--reuse", action="store_true", help="reuse a kept checkpoint/artifact (skip those stages)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    tag = f"L{a.layers}_S{a.ltm_rows}"
    a.ckpt, a.art = str(Path(a.dir) / f"ckpt_{tag}"), str(Path(a.dir) / f"art_{tag}")
    if a.stage:
        fn = {"ckpt": stage_ckpt, "export": stage_export, "engine": stage_engine}[a.stage]
        print(json.dumps(fn(a)))
        return
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    res = {"layers": a.layers, "ltm_rows": a.ltm_rows, "merge_every": a.merge_every, "cpu": cpu()}
    for st in ("ckpt", "export", "engine"):
        done = Path(a.art if st == "export" else a.ckpt) / ("manifest.json" if st == "export" else "config.json")
        if a.reuse and st != "engine" and done.exists():
            res[st] = json.loads((Path(a.dir) / f"{st}_{tag}.json").read_text())
            continue
        res[st] = run_child(st, a)
        if st != "engine":
            (Path(a.dir) / f"{st}_{tag}.json").write_text(json.dumps(res[st]))
    md = markdown(res)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    if not a.keep:
        shutil.rmtree(a.ckpt, ignore_errors=True)
        shutil.rmtree(a.art, ignore_errors=True)


if __name__ == "__main__":
    main()
