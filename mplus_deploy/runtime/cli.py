"""``mplus-run OUT [--memorize FILE ...] --prompt TEXT [--stream] [--max-new-tokens N] [--backend ...] [--seed N]``

Argument groups (Polygraphy style): each adds, parses and validates its own flags.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

from mplus_deploy.util.io import write_error


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

    def check(self, a, p) -> None:
        if a.threads is not None and a.threads <= 0:
            p.error(f"--threads {a.threads}: must be >= 1 (or omit it for onnxruntime's default)")

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
        if a.chunk_size <= 0:
            p.error(f"--chunk-size {a.chunk_size}: must be >= 1 token")
        for f in a.memorize + ([a.load_memory] if a.load_memory else []):
            what = "--memorize" if f in a.memorize else "--load-memory"
            path = Path(f)
            if path.is_dir():
                p.error(f"{what} {f}: is a directory, not a file (pass the text files in it, e.g. {f}/*.txt)")
            if not path.is_file():
                p.error(f"{what} {f}: no such file")
        self.texts = []
        for f in a.memorize:  # read and checked up front: a bad third file must not cost two memorize passes
            try:
                raw = Path(f).read_bytes()
            except OSError as e:
                p.error(f"--memorize {f}: cannot read it ({e.strerror or e})")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                p.error(f"--memorize {f}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`")
            if not text.strip():
                p.error(f"--memorize {f}: the file is empty; nothing to memorize")
            self.texts.append((f, _ids(text, f"--memorize {f}", p) if a.ids else text))
        if a.save_memory:
            _check_writable(a.save_memory, "--save-memory", p)

    def run(self, eng, a) -> None:
        if a.load_memory:
            eng.load_memory(a.load_memory)
        chunk = min(a.chunk_size, _limit(eng, "max_chunk") or a.chunk_size)  # the exported memory_update range
        for f, text in self.texts:
            eng.memorize(text, chunk_size=chunk, progress=not a.quiet)
        if a.save_memory:
            try:
                eng.save_memory(a.save_memory)
            except OSError as e:
                raise CliError(_write_error(e, a.save_memory, "--save-memory")) from None


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
        if a.max_new_tokens < 0:
            p.error(f"--max-new-tokens {a.max_new_tokens}: must be >= 0")
        if a.prompt is not None and a.ids:
            self.prompt_ids = _ids(a.prompt, "--prompt", p)
            if not self.prompt_ids:
                p.error("--prompt: no token ids given (--ids expects e.g. --prompt '1 2 3')")

    def check_window(self, eng, a) -> None:
        """The prompt against the artifact's limits, before any memory work: max_prompt (mplus-export
        --max-prompt, the graphs' range) and the generation window (prompt + --max-new-tokens)."""
        if a.prompt is None:
            return
        try:
            n = len(self.prompt_ids) if a.ids else int(eng._prompt_ids(a.prompt).numel())
        except (AttributeError, TypeError):
            return  # the engine checks it itself
        max_prompt = _limit(eng, "max_prompt")
        if max_prompt and n > max_prompt:
            raise CliError(f"--prompt is {n} tokens; this artifact was exported with max_prompt={max_prompt} "
                           "(mplus-export --max-prompt): shorten the prompt, memorize its front with --memorize, "
                           "or re-export with a larger --max-prompt")
        window = eng.config.max_window
        if n + a.max_new_tokens > window:
            room = window - n
            fix = (f"pass --max-new-tokens {room} or less" if room > 0 else
                   "shorten the prompt (memorize its front with --memorize)")
            raise CliError(f"--prompt ({n} tokens) + --max-new-tokens {a.max_new_tokens} exceeds this model's "
                           f"generation window of {window} tokens (prompt + generated); {fix}")

    def run(self, eng, a, out=None) -> None:
        out = out or sys.stdout
        if a.prompt is None:
            return
        kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature, top_p=a.top_p,
                  top_k=a.top_k, seed=a.sample_seed)
        if a.ids:
            toks = eng.generate_ids(self.prompt_ids, **kw)
            print(" ".join(str(int(t)) for t in toks), file=out)
            return
        if a.stream:
            for piece in eng.generate(a.prompt, stop=a.stop, stream=True, **kw):
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            print(eng.generate(a.prompt, stop=a.stop, **kw), file=out)


class CliError(Exception):
    """An input or environment error: printed without a traceback, exit code 2."""


def _ids(text: str, what: str, p) -> list[int]:
    bad = [x for x in text.replace(",", " ").split() if not x.lstrip("-").isdigit()]
    if bad:
        p.error(f"{what}: --ids expects whitespace or comma separated integers, got {bad[0]!r}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + "; drop --ids to pass text")
    return [int(x) for x in text.replace(",", " ").split()]


def _limit(eng, key: str):
    """``limits.<key>`` of the artifact's manifest (the exported graphs' range), None when not recorded."""
    try:
        return int(eng._core.source.manifest["limits"][key])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _write_error(e: OSError, path, what: str) -> str:
    if e.errno == errno.EISDIR:
        return f"{what} {path}: is a directory; name a file, e.g. {Path(path) / 'memory.safetensors'}"
    return write_error(e, what, path, "write the snapshot to a writable directory")


def _check_writable(path, what: str, p) -> None:
    """Before any work: ``path`` is not a directory, its folder exists, and a file can be created there."""
    path = Path(path)
    if path.is_dir():
        p.error(f"{what} {path}: is a directory; name a file, e.g. {path / 'memory.safetensors'}")
    parent = path.parent
    if not parent.is_dir():
        p.error(f"{what} {path}: the directory {parent} does not exist (create it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        p.error(_write_error(e, path, what))


def _broken_graph(path) -> str | None:
    """The first graph file of the artifact that does not parse as ONNX (its name for the message)."""
    import onnx

    root = Path(path)
    try:
        graphs = json.loads((root / "manifest.json").read_text())["graphs"]
    except (OSError, ValueError, KeyError):
        return None
    for g in graphs.values():
        f = root / g.get("file", "")
        try:
            onnx.load(str(f), load_external_data=False)
        except Exception:  # noqa: BLE001 - DecodeError and friends: this is the broken one
            return str(f)
    return None


def _is_graph_error(e: BaseException) -> bool:
    return type(e).__name__ == "DecodeError" or type(e).__module__.startswith(("onnxruntime", "google.protobuf"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mplus-run", description="Memorize text into an M+ model and generate from it.")
    groups = [EngineArgs(), MemoryArgs(), GenerateArgs()]
    for g in groups:
        g.add(p)
    p.add_argument("--stats", action="store_true", help="print the memory stats (JSON) to stderr at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    for g in groups:
        g.check(a, p)
    try:
        try:
            eng = groups[0].build(a)
        except Exception as e:
            if not _is_graph_error(e):
                raise
            bad = _broken_graph(a.path)
            raise CliError(f"{bad or a.path}: not a valid ONNX graph (truncated or corrupt: {e}); re-export the "
                           f"artifact with mplus-export") from None
        groups[2].check_window(eng, a)
        groups[1].run(eng, a)
        groups[2].run(eng, a)
    except CliError as e:
        print(f"mplus-run: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"mplus-run: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mplus-run: error: {getattr(e, 'filename', None) or a.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    if a.stats:
        print(json.dumps({"backend": eng.backend, **eng.memory}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
