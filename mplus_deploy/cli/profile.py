"""``mplus-profile OUT [--backend ...] [--prompt-lens 64,512,2048] [--ltm-sizes 0,16k,64k,160k] [--new-tokens 128]
[--warmup N] [--repeat N] [--json F] [--markdown F] [--plot F.png] [--compare OUT2 ...]``

Argument groups (``cli/args.py``): ``ModelArgs`` (the artifacts), the shared ``BackendArgs``,
``WorkloadArgs``, ``TimingArgs`` and ``OutputArgs``. Exit codes: 0 ok, 2 usage or input error (printed
without a traceback).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mplus_deploy.util.io import write_error as io_write_error

from .args import ArgGroup, BackendArgs, UsageError, build_parser, check_writable, parse_groups


def parse_size(tok: str, what: str) -> int:
    """``16k`` = 16384, ``1m`` = 1048576, plain integers as given; must be >= 0."""
    t = tok.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1024 * 1024
    try:
        v = float(t) * mult
    except ValueError:
        raise UsageError(f"{what}: {tok!r} is not a size (use integers, optionally with k = 1024 or m = 1024², "
                         "e.g. 0,16k,64k,160k)") from None
    if v < 0 or v != int(v) or math_isnan(v):
        raise UsageError(f"{what}: {tok!r} must be a non-negative whole number")
    return int(v)


def math_isnan(v: float) -> bool:
    return v != v


def parse_list(s: str, what: str, positive: bool = False) -> tuple[int, ...]:
    parts = [p for p in s.split(",") if p.strip()]
    if not parts:
        raise UsageError(f"{what}: empty list")
    vals = tuple(parse_size(p, what) for p in parts)
    if positive and min(vals) <= 0:
        raise UsageError(f"{what}: values must be > 0, got {s!r}")
    return vals


class ModelArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("model")
        g.add_argument("path", metavar="OUT", help="exported artifact directory (mplus-export -o OUT); with --backend "
                                                   "torch also a checkpoint directory or a preset name")
        g.add_argument("--compare", nargs="+", default=[], metavar="OUT2",
                       help="more artifacts to profile with the same settings, shown side by side")

    def parse(self, a):
        from mplus_deploy.model.presets import names as preset_names

        names = set(preset_names())
        for p in [a.path] + a.compare:
            path = Path(p)
            if path.is_dir() and (path / "manifest.json").exists():
                continue
            if path.is_dir() and (path / "config.json").exists() and a.backend == "torch":
                continue
            if p in names and a.backend == "torch":
                continue
            if not path.exists():
                raise UsageError(f"{p}: no such artifact directory (export one with `mplus-export SRC -o {p}`; "
                                 "presets and checkpoints need --backend torch)")
            raise UsageError(f"{p}: not an exported artifact (no manifest.json); run `mplus-export` first")
        self.path, self.compare = a.path, a.compare


class WorkloadArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("workload")
        g.add_argument("--prompt-lens", default="64,512,2048", metavar="LIST",
                       help="prompt lengths in tokens (clipped to the artifact's window); default 64,512,2048")
        g.add_argument("--ltm-sizes", default="0,16k,64k,160k", metavar="LIST",
                       help="LTM rows per layer for the query-latency sweep, k = 1024 (0 = the artifact's initial LTM; "
                            "larger sizes are filled synthetically); default 0,16k,64k,160k")
        g.add_argument("--new-tokens", type=int, default=128, metavar="N", help="tokens generated per query (default 128)")
        g.add_argument("--memorize-chunks", type=int, default=None, metavar="N",
                       help="memory updates to time (default: update_ltm_frequency + 1, so one LTM merge is included)")
        g.add_argument("--seed", type=int, default=0)

    def parse(self, a):
        self.prompt_lens = parse_list(a.prompt_lens, "--prompt-lens", positive=True)
        self.ltm_sizes = parse_list(a.ltm_sizes, "--ltm-sizes")
        if a.new_tokens <= 0:
            raise UsageError(f"--new-tokens must be > 0, got {a.new_tokens}")
        if a.memorize_chunks is not None and a.memorize_chunks <= 0:
            raise UsageError(f"--memorize-chunks must be > 0, got {a.memorize_chunks}")
        self.new_tokens, self.memorize_chunks, self.seed = a.new_tokens, a.memorize_chunks, a.seed


class TimingArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("timing")
        g.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs before each measurement (default 1)")
        g.add_argument("--repeat", type=int, default=5, metavar="N", help="timed runs per measurement (default 5)")

    def parse(self, a):
        if a.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {a.warmup}")
        if a.repeat <= 0:
            raise UsageError(f"--repeat must be > 0, got {a.repeat}")
        self.warmup, self.repeat = a.warmup, a.repeat


class OutputArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("output")
        g.add_argument("--json", metavar="F", help="write all measurements as JSON")
        g.add_argument("--markdown", metavar="F", help="write the tables as markdown")
        g.add_argument("--plot", metavar="F.png", help="write per-stage bars and query latency vs LTM size (PNG)")
        g.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    def parse(self, a):
        for flag, f in (("--json", a.json), ("--markdown", a.markdown), ("--plot", a.plot)):
            if f and not Path(f).resolve().parent.is_dir():
                raise UsageError(f"{f}: the directory {Path(f).resolve().parent} does not exist")
        if a.plot and not a.plot.lower().endswith(".png"):
            raise UsageError(f"--plot {a.plot}: the plot is a PNG; name it *.png")
        for flag, f in (("--json", a.json), ("--markdown", a.markdown), ("--plot", a.plot)):
            if f:
                check_writable(f, flag)  # before the run: a read-only path must not cost the whole profile
        self.json, self.markdown, self.plot, self.quiet = a.json, a.markdown, a.plot, a.quiet


GROUPS = (ModelArgs, BackendArgs, WorkloadArgs, TimingArgs, OutputArgs)


def write_error(e: OSError, path, flag: str) -> str:
    return io_write_error(e, flag, path, "write it to a writable directory")


def main(argv: list[str] | None = None) -> int:
    groups = [G() for G in GROUPS]
    parser = build_parser("mplus-profile", "Per-stage latency, tokens/s, memory and achieved memory bandwidth of "
                          "an exported M+ artifact (docs/profiling.md).", groups)
    a = parser.parse_args(argv)  # argparse itself exits 2 on a missing OUT / unknown flag
    try:
        parse_groups(groups, a)
    except UsageError as e:
        print(f"mplus-profile: error: {e}", file=sys.stderr)
        return 2
    model, backend, work, timing, out = groups
    os.environ.setdefault("MPLUS_PROGRESS", "0")
    from mplus_deploy.profiling import report
    from mplus_deploy.profiling.profiler import Settings, profile

    log = (lambda *_: None) if out.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    settings = Settings(prompt_lens=work.prompt_lens, ltm_sizes=work.ltm_sizes, new_tokens=work.new_tokens,
                        warmup=timing.warmup, repeat=timing.repeat, memorize_chunks=work.memorize_chunks, seed=work.seed)
    try:
        res = profile(model.path, **backend.options(), settings=settings, log=log)
        others = [profile(p, **backend.options(), settings=settings, log=log) for p in model.compare]
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # ArtifactError, BackendUnavailable, ...
        print(f"mplus-profile: error: {e}", file=sys.stderr)
        return 2
    flag = "--json"
    try:
        if out.json:  # files first: a broken terminal or plotting install must not lose the measurements
            report.write_json(res, out.json, others)
        flag = "--markdown"
        if out.markdown:
            Path(out.markdown).write_text(report.to_markdown(res, others))
        report.print_rich(res, others=others)
        flag = "--plot"
        if out.plot:
            report.plot(res, out.plot, others)
    except OSError as e:
        print(f"mplus-profile: error: {write_error(e, getattr(out, flag[2:]), flag)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
