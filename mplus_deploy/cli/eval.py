"""``mplus-eval retention OUT [--quantized MODE ...] [--distractors 0,2,5,10] [--facts builtin|FILE.jsonl]
[--n-facts N] [--max-new-tokens M] [--chunk-size C] [--json F] [--markdown F] [--plot F.png]``

The paper's knowledge-retention protocol on an exported artifact (docs/evaluation.md): exact-hit rate over the
number of distractor chunks memorized after the fact, per ``--quantized`` mode (``fp32`` = the fp32 graphs).
Argument groups (``cli/args.py``): the shared ``ArtifactArgs``-style path and ``BackendArgs``, and
``RetentionArgs``. Exit codes: 0 ok, 2 usage or input error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import INPUT_ERRORS, ArgGroup, BackendArgs, UsageError, check_writable, parse_or_usage, report_error


class RetentionArgs(ArgGroup):
    def add(self, p) -> None:
        g = p.add_argument_group("retention")
        g.add_argument("path", metavar="OUT", help="exported artifact directory (or a preset with --backend torch)")
        g.add_argument("--quantized", nargs="+", default=["fp32"], metavar="MODE",
                       help="graph sets to evaluate: fp32 and/or the artifact's fp8, int8, int4 (default fp32)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the artifact's tokenizer/)")
        g.add_argument("--distractors", default="0,2,5,10", metavar="LIST", help="distractor chunk counts N")
        g.add_argument("--facts", default="builtin", help="builtin (made-up facts) or a JSONL of {context, question, answers}")
        g.add_argument("--n-facts", type=int, default=24, metavar="N", help="builtin facts to generate (default 24)")
        g.add_argument("--max-new-tokens", type=int, default=8, metavar="M", help="greedy tokens per answer (default 8)")
        g.add_argument("--chunk-size", type=int, default=512, metavar="C", help="tokens per distractor chunk")
        g.add_argument("--seed", type=int, default=0, help="drop seed of every session and of the builtin facts")
        g.add_argument("--json", metavar="F")
        g.add_argument("--markdown", metavar="F")
        g.add_argument("--plot", metavar="F.png")
        g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def parse(self, a) -> None:
        from mplus_deploy.evaluation.facts import builtin_facts, load_jsonl
        from mplus_deploy.evaluation.retention import Settings, check

        try:
            ns = tuple(int(x) for x in a.distractors.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--distractors {a.distractors!r}: comma-separated integers, e.g. 0,2,5,10") from None
        self.settings = Settings(distractors=ns, chunk_size=a.chunk_size, max_new_tokens=a.max_new_tokens, seed=a.seed)
        try:
            check(self.settings)
        except ValueError as e:
            raise UsageError(f"--distractors/--chunk-size/--max-new-tokens: {e}") from None
        bad = [m for m in a.quantized if m not in ("fp32", "fp8", "int8", "int4")]
        if bad:
            raise UsageError(f"--quantized {bad[0]}: use fp32, fp8, int8 or int4")
        if a.n_facts <= 0:
            raise UsageError(f"--n-facts {a.n_facts}: must be > 0")
        if a.facts == "builtin":
            self.facts = builtin_facts(a.n_facts, a.seed)
        else:
            if not Path(a.facts).is_file():
                raise UsageError(f"--facts {a.facts}: no such file (or use --facts builtin)")
            try:
                self.facts = load_jsonl(a.facts)
            except (ValueError, UnicodeDecodeError) as e:
                raise UsageError(f"--facts: {e}") from None
        if a.plot and not a.plot.lower().endswith(".png"):
            raise UsageError(f"--plot {a.plot}: the plot is a PNG; name it *.png")
        for flag, f in (("--json", a.json), ("--markdown", a.markdown), ("--plot", a.plot)):
            if f:
                check_writable(f, flag)
        self.a = a


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mplus-eval", description="Evaluate what an M+ model remembers (docs/evaluation.md).")
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("retention", help="knowledge retention: exact hit vs distractor chunks")
    ret, backend = groups = [RetentionArgs(), BackendArgs()]
    for g in groups:
        g.add(r)
    a = p.parse_args(argv)
    code = parse_or_usage("mplus-eval", groups, a)
    if code is not None:
        return code
    from mplus_deploy.evaluation import retention
    from mplus_deploy.runtime import Engine
    from mplus_deploy.util.io import atomic_replace_from, atomic_write_text

    log = (lambda *_: None) if a.quiet else (lambda m: print(f"mplus-eval: {m}", file=sys.stderr, flush=True))
    results = {}
    try:
        for mode in a.quantized:
            extra = {} if mode == "fp32" else {"quantized": mode}
            eng = Engine(a.path, tokenizer=a.tokenizer, **backend.options(), **extra)
            log(f"{mode}: {len(ret.facts)} facts, N = {list(ret.settings.distractors)}")
            results[mode] = retention.run(eng, ret.facts, ret.settings, progress=not a.quiet and sys.stderr.isatty(),
                                          log=log)
            eng.close()
            log(f"{mode}: " + ", ".join(f"N={n}: {results[mode].rate[n]:.0%}" for n in ret.settings.distractors))
    except (*INPUT_ERRORS, OSError) as e:  # ArtifactError, no tokenizer, no such mode, ...
        return report_error("mplus-eval", e, a.path)
    md = retention.to_markdown(results)
    print(md)
    if a.json:
        atomic_write_text(Path(a.json), retention.to_json(results))
    if a.markdown:
        atomic_write_text(Path(a.markdown), md)
    if a.plot:
        atomic_replace_from(lambda tmp: retention.plot(results, tmp), Path(a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
