"""``mplus-run OUT [--memorize FILE ...] --prompt TEXT [--stream] [--max-new-tokens N] [--backend ...] [--seed N]``

Argument groups (``cli/args.py``): the shared ``ArtifactArgs`` (the artifact, quantized mode, tokenizer),
``BackendArgs`` and ``SamplingArgs``, and this tool's ``MemoryArgs`` and ``PromptArgs``. Every flag and input file is
checked before the engine loads; exit codes 0 ok, 2 usage or input error (printed without a traceback).
"""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

from mplus_deploy.model.rules import check_window
from mplus_deploy.util.io import write_error

from .args import (INPUT_ERRORS, ArgGroup, ArtifactArgs, BackendArgs, SamplingArgs, UsageError, build_parser,
                   check_writable, parse_groups, report_error)


class MemoryArgs(ArgGroup):
    def add(self, p) -> None:
        g = p.add_argument_group("memory")
        g.add_argument("--memorize", nargs="+", default=[], metavar="FILE", help="text files to memorize, in order")
        g.add_argument("--chunk-size", type=int, default=512, help="tokens per memory update (capped at max_chunk)")
        g.add_argument("--seed", type=int, default=None, help="seed of the STM drop generator (spec §9)")
        g.add_argument("--load-memory", metavar="FILE", help="restore a memory snapshot before memorizing")
        g.add_argument("--save-memory", metavar="FILE", help="write a memory snapshot after memorizing")

    def parse(self, a) -> None:
        if a.chunk_size <= 0:
            raise UsageError(f"--chunk-size {a.chunk_size}: must be >= 1 token")
        for f in a.memorize + ([a.load_memory] if a.load_memory else []):
            what = "--memorize" if f in a.memorize else "--load-memory"
            path = Path(f)
            if path.is_dir():
                raise UsageError(f"{what} {f}: is a directory, not a file (pass the text files in it, e.g. {f}/*.txt)")
            if not path.is_file():
                raise UsageError(f"{what} {f}: no such file")
        self.texts = []
        for f in a.memorize:  # read and checked up front: a bad third file must not cost two memorize passes
            try:
                raw = Path(f).read_bytes()
            except OSError as e:
                raise UsageError(f"--memorize {f}: cannot read it ({e.strerror or e})") from None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"--memorize {f}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                 "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
            if not text.strip():
                raise UsageError(f"--memorize {f}: the file is empty; nothing to memorize")
            self.texts.append((f, _ids(text, f"--memorize {f}") if a.ids else text))
        if a.save_memory:
            check_writable(a.save_memory, "--save-memory", "write the snapshot to a writable directory")

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
                raise UsageError(_write_error(e, a.save_memory, "--save-memory")) from None


class PromptArgs(ArgGroup):
    def add(self, p) -> None:
        g = p.add_argument_group("prompt")
        g.add_argument("--prompt", help="prompt text (or token ids with --ids)")
        g.add_argument("--stream", action="store_true", help="print text as it is generated")
        g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        g.add_argument("--ids", action="store_true", help="--prompt and --memorize files hold whitespace/comma "
                                                          "separated token ids; print generated ids")

    def parse(self, a) -> None:
        if a.prompt is None and not (a.memorize or a.stats):
            raise UsageError("nothing to do: pass --prompt (and/or --memorize FILE ..., --stats)")
        if a.prompt is not None and a.ids:
            self.prompt_ids = _ids(a.prompt, "--prompt")
            if not self.prompt_ids:
                raise UsageError("--prompt: no token ids given (--ids expects e.g. --prompt '1 2 3')")

    def check_window(self, eng, a, params) -> None:
        """The prompt against the artifact's limits, before any memory work: max_prompt (mplus-export
        --max-prompt, the graphs' range) and the generation window (prompt + --max-new-tokens)."""
        if a.prompt is None:
            return
        n = len(self.prompt_ids) if a.ids else int(eng.codec.encode_prompt(a.prompt).numel())
        max_prompt = _limit(eng, "max_prompt")
        if max_prompt and n > max_prompt:
            raise UsageError(f"--prompt is {n} tokens; this artifact was exported with max_prompt={max_prompt} "
                             "(mplus-export --max-prompt): shorten the prompt, memorize its front with --memorize, "
                             "or re-export with a larger --max-prompt")
        window, new = eng.config.max_window, params.max_new_tokens
        try:
            check_window(eng.config, n, new)  # the rule (model/rules.py); the message below names the flags
        except ValueError:
            room = window - n
            fix = (f"pass --max-new-tokens {room} or less" if room > 0 else
                   "shorten the prompt (memorize its front with --memorize)")
            raise UsageError(f"--prompt ({n} tokens) + --max-new-tokens {new} exceeds this model's "
                             f"generation window of {window} tokens (prompt + generated); {fix}") from None

    def run(self, eng, a, params, out=None) -> None:
        out = out or sys.stdout
        if a.prompt is None:
            return
        if a.ids:
            toks = eng.generate_ids(self.prompt_ids, params=params)
            print(" ".join(str(int(t)) for t in toks), file=out)
            return
        if a.stream:
            for piece in eng.generate(a.prompt, params=params, stop=a.stop, stream=True):
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            print(eng.generate(a.prompt, params=params, stop=a.stop), file=out)


def _ids(text: str, what: str) -> list[int]:
    bad = [x for x in text.replace(",", " ").split() if not x.lstrip("-").isdigit()]
    if bad:
        raise UsageError(f"{what}: --ids expects whitespace or comma separated integers, got {bad[0]!r}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + "; drop --ids to pass text")
    return [int(x) for x in text.replace(",", " ").split()]


def _limit(eng, key: str):
    """``limits.<key>`` of the artifact's manifest (the exported graphs' range), None when not recorded."""
    try:
        return int(eng.source.manifest["limits"][key])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _write_error(e: OSError, path, what: str) -> str:
    if e.errno == errno.EISDIR:
        return f"{what} {path}: is a directory; name a file, e.g. {Path(path) / 'memory.safetensors'}"
    return write_error(e, what, path, "write the snapshot to a writable directory")


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
    model, backend, memory, prompt, sampling = groups = [ArtifactArgs(), BackendArgs(), MemoryArgs(), PromptArgs(),
                                                         SamplingArgs()]
    p = build_parser("mplus-run", "Memorize text into an M+ model and generate from it.", groups)
    p.add_argument("--stats", action="store_true", help="print the memory stats (JSON) to stderr at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)  # argparse itself exits 2 on a missing OUT / unknown flag
    try:
        parse_groups(groups, a)
        try:
            eng = model.build(backend, a.seed)
        except Exception as e:
            if not _is_graph_error(e):
                raise
            bad = _broken_graph(a.path)
            raise UsageError(f"{bad or a.path}: not a valid ONNX graph (truncated or corrupt: {e}); re-export the "
                             f"artifact with mplus-export") from None
        prompt.check_window(eng, a, sampling.params)
        memory.run(eng, a)
        prompt.run(eng, a, sampling.params)
    except (*INPUT_ERRORS, OSError) as e:
        return report_error("mplus-run", e, a.path)
    if a.stats:
        print(json.dumps({"backend": eng.backend, **eng.memory}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
