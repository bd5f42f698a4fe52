"""``mplus-run OUT [--memorize FILE ...] --prompt TEXT [--stream] [--max-new-tokens N] [--backend ...] [--seed N]``

Argument groups (Polygraphy style): each adds, parses and validates its own flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class EngineArgs:
    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model")
        g.add_argument("path", help="exported artifact directory (manifest.json); for --backend torch also a "
                                    "checkpoint directory or a preset name")
        g.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
        g.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        g.add_argument("--threads", type=int, default=None, help="intra-op threads")
        g.add_argument("--quantized", choices=["fp8", "int8", "int4"], default=None,
                       help="run the artifact's quantized graphs of this mode (onnxruntime; from mplus-export --fp8/--int8/--int4)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the artifact's tokenizer/)")

    def build(self, a):
        from mplus_deploy.runtime import Engine

        extra = {"quantized": a.quantized} if a.quantized else {}
        return Engine(a.path, backend=a.backend, device=a.device, threads=a.threads, seed=a.seed,
                      tokenizer=a.tokenizer, **extra)


class MemoryArgs:
    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("memory")
        g.add_argument("--memorize", nargs="+", default=[], metavar="FILE", help="text files to memorize, in order")
        g.add_argument("--chunk-size", type=int, default=512, help="tokens per memory update (capped at max_chunk)")
        g.add_argument("--seed", type=int, default=None, help="seed of the STM drop generator (spec §9)")
        g.add_argument("--load-memory", metavar="FILE", help="restore a memory snapshot before memorizing")
        g.add_argument("--save-memory", metavar="FILE", help="write a memory snapshot after memorizing")

    def check(self, a, p) -> None:
        for f in a.memorize + ([a.load_memory] if a.load_memory else []):
            if not Path(f).is_file():
                p.error(f"{f}: no such file")

    def run(self, eng, a) -> None:
        if a.load_memory:
            eng.load_memory(a.load_memory)
        for f in a.memorize:
            text = Path(f).read_text(encoding="utf-8")
            eng.memorize(_ids(text) if a.ids else text, chunk_size=a.chunk_size, progress=not a.quiet)
        if a.save_memory:
            eng.save_memory(a.save_memory)


class GenerateArgs:
    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("generation")
        g.add_argument("--prompt", help="prompt text (or token ids with --ids)")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--stream", action="store_true", help="print text as it is generated")
        g.add_argument("--do-sample", action="store_true")
        g.add_argument("--temperature", type=float, default=1.0)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--sample-seed", type=int, default=None, help="seed of the sampling generator")
        g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        g.add_argument("--ids", action="store_true", help="--prompt and --memorize files hold whitespace/comma "
                                                          "separated token ids; print generated ids")

    def check(self, a, p) -> None:
        if a.prompt is None and not (a.memorize or a.stats):
            p.error("nothing to do: pass --prompt (and/or --memorize FILE ..., --stats)")

    def run(self, eng, a, out=None) -> None:
        out = out or sys.stdout
        if a.prompt is None:
            return
        kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature, top_p=a.top_p,
                  top_k=a.top_k, seed=a.sample_seed)
        if a.ids:
            toks = eng.generate_ids(_ids(a.prompt), **kw)
            print(" ".join(str(int(t)) for t in toks), file=out)
            return
        if a.stream:
            for piece in eng.generate(a.prompt, stop=a.stop, stream=True, **kw):
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            print(eng.generate(a.prompt, stop=a.stop, **kw), file=out)


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit("--ids: expected whitespace or comma separated integers") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mplus-run", description="Memorize text into an M+ model and generate from it.")
    groups = [EngineArgs(), MemoryArgs(), GenerateArgs()]
    for g in groups:
        g.add(p)
    p.add_argument("--stats", action="store_true", help="print the memory stats (JSON) to stderr at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    for g in groups[1:]:
        g.check(a, p)
    try:
        eng = groups[0].build(a)
        groups[1].run(eng, a)
        groups[2].run(eng, a)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"mplus-run: error: {e}", file=sys.stderr)
        return 2
    if a.stats:
        print(json.dumps({"backend": eng.backend, **eng.memory}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
