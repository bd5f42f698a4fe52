"""mplus-serve under load: 16 concurrent streaming clients x 10 requests on mixed memories (issue 18).

Client-side time to first token (first SSE chunk with text) and end-to-end latency, p50/p99; throughput in
requests/s and generated tokens/s; server-side histograms from /metrics. The model is ``tiny`` (exported with a
character tokenizer) or ``demo`` (torch backend, or ``--artifact DIR`` for an exported one).

    python bench/serve_load.py [--model tiny|demo] [--artifact DIR] [--clients 16] [--requests 10] [--write]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = ["Anna keeps the red key in the kitchen drawer, next to the old radio. " * 3,
        "Bruno hid the treasure map under the third stair of the cellar. " * 3,
        "Chen wrote the password on a yellow note behind the clock. " * 3]
PROMPTS = ["Where is the key?", "Who hid the map?", "What is on the yellow note?", "Tell me a story."]


def _engine(a, tmp: Path):
    from mplus_deploy.runtime import Engine

    if a.artifact:
        return Engine(a.artifact, threads=a.threads, seed=0)
    if a.model == "demo":
        return Engine("demo", backend="torch", threads=a.threads, seed=0)
    from mplus_deploy.build import export_artifact
    from tests.runtime.conftest import char_tokenizer, tiny_model

    out = tmp / "tiny"
    export_artifact(tiny_model(), out, validate=False, tokenizer=char_tokenizer(), source={"preset": "tiny"})
    return Engine(out, threads=a.threads, seed=0)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    import httpx

    from tests.serve.conftest import LiveServer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "demo"], default="tiny")
    p.add_argument("--artifact")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        eng = _engine(a, Path(tmp))
        srv = LiveServer(eng, Path(tmp) / "store", model_name="m", max_queue=max(64, a.clients))
        users = [None] + [f"user{i}" for i in range(len(DOCS))]
        for u, d in zip(users[1:], DOCS):
            httpx.post(f"{srv.url}/v1/memory/{u}/memorize", json={"text": d}, timeout=300).raise_for_status()
        rng = random.Random(0)

        def client(k):
            out = []
            with httpx.Client(timeout=300) as c:
                for _ in range(a.requests):
                    body = {"model": "m", "prompt": rng.choice(PROMPTS), "max_tokens": a.max_tokens, "temperature": 0,
                            "stream": True}
                    u = users[k % len(users)]
                    if u:
                        body["user"] = u
                    t0, first, n = time.perf_counter(), None, 0
                    with c.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                        r.raise_for_status()
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                ch = json.loads(line[6:])
                                if ch["choices"] and ch["choices"][0]["text"]:
                                    first = first or time.perf_counter()
                                    n += 1
                    out.append((first - t0 if first else None, time.perf_counter() - t0))
            return out

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(a.clients) as ex:
            res = [x for part in ex.map(client, range(a.clients)) for x in part]
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{srv.url}/metrics").text
        srv.stop()
        eng.close()
    ttft = [r[0] * 1e3 for r in res if r[0] is not None]
    e2e = [r[1] * 1e3 for r in res]
    toks = next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("mplus_generated_tokens_total")), 0)
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    from mplus_deploy.util.machine import cpu_name

    art = f" --artifact {a.artifact}" if a.artifact else ""
    text = (f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/serve_load.py --model {a.model}{art} --clients {a.clients} "
            f"--requests {a.requests}`\n\n{cpu_name()} ({flags}), {a.threads} ORT threads, in-process uvicorn, streaming "
            f"completions of {a.max_tokens} greedy tokens, {len(users) - 1} memories + the initial one.\n\n"
            "| requests | errors | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | req/s | generated tok/s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
            f"| {len(res)} | {a.clients * a.requests - len(res)} | {statistics.median(ttft):.1f} | {_pct(ttft, 0.99):.1f} | "
            f"{statistics.median(e2e):.1f} | {_pct(e2e, 0.99):.1f} | {len(res) / wall:.1f} | {toks / wall:.1f} |\n")
    print(text)
    if a.write:
        res_md = ROOT / "bench" / "RESULTS.md"
        head = "## Issue 18: mplus-serve under load"
        body = res_md.read_text()
        res_md.write_text(body.rstrip("\n") + ("\n\n" if head in body else f"\n\n{head}\n\n") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
