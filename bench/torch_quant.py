"""Top-1 agreement of the torch backend's quantized weights with the artifact's own ORT quantized graphs (issue 17).

    mplus-export demo -o /tmp/demo_q --fp8 --int4 --calib builtin --accept-below-target
    python bench/torch_quant.py /tmp/demo_q [--modes fp8,int4] [--texts N]

For each held-out text of the quantization report (``calibration/heldout_eval.txt``): both engines start from
the artifact's memory with the same seed, memorize the first half of the text, prefill the next (up to 64) tokens
(logits of every row), and for the first 4 texts generate 16 greedy tokens. Reports, per mode: top-1 agreement over
all prompt rows, max |logit difference| / max |logit|, and greedy agreement; CPU flags with the results.

int4 ``rtn_asym`` graphs run ``MatMulNBits(accuracy_level=4)``: MLAS quantizes each activation block to int8
inside the node, a rounding that flips on 1-ulp differences upstream, so no other implementation can follow
those graphs bit for bit. The bench therefore also builds the artifact's **level-1 twin** (same files, hard
links, ``accuracy_level=1``: the same int4 weights with fp32 activations, the torch kernels' arithmetic) and
reports torch vs the twin (the weights) and ORT level 4 vs the twin (the int8 activation noise of the graphs
themselves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def level1_twin(art: Path, out: Path) -> Path:
    """A copy of ``art`` (hard links) whose int4 MatMulNBits nodes compute in fp32 (accuracy_level 1), rehashed."""
    import onnx
    import shutil

    from mplus_deploy.artifact.manifest import MANIFEST, hash_files

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(art, out, copy_function=os.link)
    for f in (out / "graphs").glob("*.int4.onnx"):
        m = onnx.load(str(f), load_external_data=False)
        for n in m.graph.node:
            for a in n.attribute:
                if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = 1
        f.unlink()  # a hard link: write a new file, never through the link
        onnx.save(m, str(f))
    mf = json.loads((out / MANIFEST).read_text())
    mf["files"] = hash_files(out)
    (out / MANIFEST).unlink()
    (out / MANIFEST).write_text(json.dumps(mf, indent=1))
    return out


def agreement(a, b, texts, mode) -> dict:
    """Top-1 / logit / greedy agreement of engines a and b over the held-out texts (each from its own memorize)."""
    rows = agree = greedy_same = greedy_n = 0
    rel = 0.0
    for i, text in enumerate(texts):
        ids = a.codec.encode_memory(text)[:192]
        if ids.numel() < 8:
            continue
        h = ids.numel() // 2
        prompt = ids[h: h + 64]
        outs = []
        for e in (a, b):
            e.reset_memory()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e.memorize(ids[:h], progress=False)
            f = {"ids": prompt, **e.host_memory.prefill_feeds(), "logit_rows": torch.arange(prompt.numel())}
            outs.append(e.runner.infer("prefill", f)["logits"])
        x, y = outs
        rows += x.shape[0]
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        rel = max(rel, float((x - y).abs().max() / x.abs().max()))
        if i < 4:
            g = [e.generate_ids(prompt, max_new_tokens=16, stop_at_eos=False) for e in (a, b)]
            greedy_same += int((g[0] == g[1]).sum())
            greedy_n += g[0].numel()
    return {"top1_agreement": round(agree / rows, 4), "rows": rows, "max_rel_logit_diff": rel,
            "greedy_agreement": round(greedy_same / max(greedy_n, 1), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--modes", default="fp8,int4")
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--twin", default="/tmp/mplus-level1-twin", help="where the level-1 twin is built (hard links)")
    a = ap.parse_args()
    from mplus_deploy.calibration.data import heldout_texts
    from mplus_deploy.runtime import Engine
    from mplus_deploy.util.machine import cpu_name

    torch.set_num_threads(a.threads)
    texts = heldout_texts()[: a.texts]
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    results = {"cpu": f"{cpu_name()} ({flags})", "artifact": a.artifact, "texts": len(texts)}
    twin = None
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        ort = Engine(a.artifact, quantized=mode, seed=7, threads=a.threads)
        tq = Engine(a.artifact, backend="torch", quantized=mode, seed=7, threads=a.threads)
        pairs = {"torch_vs_ort": (ort, tq)}
        levels = {n.op_type for n in _nodes(Path(a.artifact), mode)} & {"MatMulNBits"}
        if levels:
            twin = level1_twin(Path(a.artifact), Path(a.twin))
            ort1 = Engine(twin, quantized=mode, seed=7, threads=a.threads)
            pairs.update({"torch_vs_ort_level1": (ort1, tq), "ort_level4_vs_ort_level1": (ort1, ort)})
        r = {name: agreement(x, y, texts, mode) for name, (x, y) in pairs.items()}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["torch_weights"] = tq.describe()["quantized_weights"]
        results[mode] = r
        print(mode, json.dumps(r), flush=True)
        for e in {id(e): e for pair in pairs.values() for e in pair}.values():
            e.close()
    if twin is not None:
        import shutil

        shutil.rmtree(twin)
    print(json.dumps(results, indent=1))
    return 0


def _nodes(art: Path, mode: str):
    import onnx

    mf = json.loads((art / "manifest.json").read_text())
    e = mf["quantized"][mode]["graphs"]["prefill"]
    return onnx.load(str(art / e["file"]), load_external_data=False).graph.node


if __name__ == "__main__":
    sys.exit(main())
