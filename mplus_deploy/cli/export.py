"""``mplus-export SRC -o OUT``: checkpoint directory | preset | ``demo`` → exported artifact (docs/graphs.md).

Argument groups (``cli/args.py``, Polygraphy's ``tools/args`` pattern): each group adds its flags, parses
and validates them. Exit codes: 0 ok, 1 validation failure (artifact kept for inspection at OUT when OUT did not
exist; an existing OUT is kept as it was) or a missed quantization target, 2 usage or input error (unknown
preset, OUT exists, missing files, out of disk space, read-only OUT, refused option), 130 interrupted.

Nothing is destroyed before it succeeds: every option is checked first, then the artifact (export and
quantization) is built in a hidden folder beside OUT (``.NAME.export-PID-XXXX``, same filesystem) and
swapped onto OUT at the end; the previous OUT is removed only after that. The checks that need the model
or the quantizer and the finishing of the staged folder are in ``staging.py``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .args import ArgGroup, UsageError, build_parser as _build_parser, parse_groups
from .export_staging import (
    _os_error,
    _retarget_reports,
    check_shapes,
    plan_quantization,
    quant_options,  # noqa: F401 (re-exported)
)


class ModelArgs(ArgGroup):
    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model")
        g.add_argument("src", metavar="SRC", help="checkpoint directory (config.json + weights), a preset name, or 'demo'")

    def parse(self, a) -> None:
        self.src = a.src

    def load(self):
        """→ (model or checkpoint directory, tokenizer). A checkpoint directory is not loaded here: the
        exporter streams its tensors (peak RSS ~ one copy of the weights, not the model plus its export)."""
        src = self.src
        looks_like_path = os.sep in src or src.startswith(".") or Path(src).exists()
        if looks_like_path and not Path(src).exists():
            raise UsageError(f"{src} does not exist (pass a checkpoint directory, a preset name or 'demo')")
        from mplus_deploy.model.config import ConfigError
        from mplus_deploy.model.presets import resolve

        try:
            if Path(src).is_dir():
                return _checkpoint_source(Path(src))
            return resolve(src)
        except (ConfigError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        except Exception as e:  # CheckpointError and friends carry actionable messages
            if type(e).__name__ in ("CheckpointError", "TokenizerError"):
                raise UsageError(str(e)) from None
            raise


def _checkpoint_source(path: Path):
    """A validated checkpoint directory (config, shards, keys and shapes checked up front) + its tokenizer."""
    from mplus_deploy.export.weights import CheckpointWeights
    from mplus_deploy.model.checkpoint import build_meta, validate_files
    from mplus_deploy.model.tokenizer import has_tokenizer, load_tokenizer

    src = CheckpointWeights(path)
    validate_files(src.cfg, build_meta(src.cfg), src.files, path)
    return src, (load_tokenizer(path) if has_tokenizer(path) else None)


class OutputArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("output")
        g.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to create")
        g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    def parse(self, a):
        self.out, self.overwrite = Path(a.output), a.overwrite
        if not self.out.name or self.out.name in (".", ".."):
            raise UsageError(f"-o {a.output}: name the artifact directory itself (e.g. -o out/tiny)")
        if os.path.lexists(self.out) and not self.overwrite:
            raise UsageError(f"{self.out} already exists; pass --overwrite to replace it")

    def check_target(self) -> None:
        """OUT's parent must be a writable directory (nothing is created here; the staging folder is next)."""
        parent = self.out.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"-o {self.out}: {parent} is a file, not a directory; choose another -o path")
        if self.out.exists() and not self.out.is_dir() and not self.out.is_symlink() and not self.out.is_file():
            raise UsageError(f"-o {self.out}: exists and is neither a directory nor a file; remove it or choose another -o")


class PrecisionArgs(ArgGroup):
    QUANT = ("fp8", "int8", "int4")

    def add(self, p):
        g = p.add_argument_group("precision")
        g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                       help="weight precision: fp32; fp16 (fp16 weights, I/O and math); bf16 (bf16 weights, fp32 math "
                            "and I/O: what ONNX Runtime's CPU EP runs, exact for bf16 checkpoints at half the bytes "
                            "of fp32); auto (default): the checkpoint's own dtype (presets and demo: fp32)")
        for q, what in (("fp8", ("FP8 E4M3 graphs (default scheme: per-channel weights with GPTQ rounding, fp32 "
                                 "activations; needs --calib)")),
                        ("int8", "INT8 graphs (default scheme: as --fp8; needs --calib)"),
                        ("int4", "INT4 graphs (default scheme: asymmetric 4-bit blocks with LoRA folded in, data-free)")):
            g.add_argument(f"--{q}", action="store_true", help=f"add {what} next to the fp32 ones; any scheme option "
                           "below replaces the default scheme (docs/quantization.md \"Default schemes\")")
        g.add_argument("--accept-below-target", action="store_true",
                       help="keep going (exit 0) when the quantized graphs miss their report's top-1 target "
                            "(fp8 0.95, int8 0.97, int4 0.90); without it that exits 1")
        g.add_argument("--report-retention", type=int, default=None, metavar="N",
                       help="the report's knowledge retention (N = 0 and 10 distractor chunks, fp32 vs quantized) on N "
                            "builtin facts; default 12 when the model has a tokenizer, 0 = off")
        g.add_argument("--calib", metavar="FILE|builtin", default=None,
                       help="calibration text: .txt (paragraphs) or .jsonl ({\"text\": ...}), or 'builtin' "
                            "(a small shipped corpus, a documented fallback)")
        g.add_argument("--calib-samples", type=int, default=None, metavar="N", help="at most N calibration texts")
        g.add_argument("--calib-method", default=None, choices=["max", "entropy", "awq_clip", "awq_lite", "rtn_dq", "rtn_asym"],
                       help="fp8/int8: max (default) | entropy; int4: rtn_dq (default; ModelOpt symmetric Q/DQ, TensorRT "
                            "and ORT) | awq_clip | awq_lite | rtn_asym (asymmetric min/max blocks = llama.cpp Q4_1 grid, "
                            "ORT MatMulNBits; lossless for Q4_1-sourced weights such as the demo's)")
        g.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (kept high precision by default)")
        g.add_argument("--lm-head-bits", type=int, choices=[4, 8, 32], default=None, metavar="{4,8,32}",
                       help="int4 rtn_asym: the lm_head's grid (8 = llama.cpp's Q8_0, the --int4 default; 4 = the "
                            "4-bit grid of the other MatMuls; 32 = keep it fp32); other modes ignore it")
        g.add_argument("--quant-exclude", action="append", default=[], metavar="REGEX",
                       help="mixed precision: keep MatMuls whose ONNX node name matches REGEX in fp32 "
                            "(e.g. '^/layers\\.(0|29)/'); repeatable")
        g.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                       help="scale each MatMul input channel before quantizing (SmoothQuant for fp8/int8, AWQ-style "
                            "for int4): s = amax(x)^A / amax(w)^(1-A), an exact rewrite; off by default "
                            "(measured on the demo: 0.7 for int8 and int4, none for fp8; docs/quantization.md)")
        g.add_argument("--merge-lora", action="store_true",
                       help="fold each graph's LoRA branch into its base weight before quantizing (one quantized "
                            "weight per target; removes 3 MatMuls + Mul + Add per target from decode)")
        g.add_argument("--quant-auto-exclude", action="store_true",
                       help="mixed precision: simulate the quantization on the torch reference and keep the fewest, "
                            "most sensitive decoder layers in fp32 so that top-1 agreement reaches the mode's target")
        g.add_argument("--quant-auto-granularity", choices=["layer", "unit"], default="layer",
                       help="what --quant-auto-exclude keeps in fp32: whole decoder layers (default) or units "
                            "(qkv / o_proj / gate_up / down_proj of one layer: more of the model stays quantized)")
        g.add_argument("--quant-weight-only", action="store_true",
                       help="fp8/int8: quantize weights only (drop ModelOpt's per-tensor activation Q/DQ; W8A16)")
        g.add_argument("--gptq", action="store_true",
                       help="round the weights with GPTQ on ModelOpt's scales (same format, error-compensating "
                            "values from calibration-activation Hessians; needs --calib)")

    def parse(self, a):
        self.quant = [q for q in self.QUANT if getattr(a, q)]
        self.precision = a.precision
        self.calib, self.calib_samples, self.calib_method = a.calib, a.calib_samples, a.calib_method
        self.quantize_lm_head, self.lm_head_bits = a.quantize_lm_head, a.lm_head_bits
        self.exclude, self.auto_exclude = list(a.quant_exclude), a.quant_auto_exclude
        for rx in self.exclude:
            try:
                re.compile(rx)
            except re.error as e:
                raise UsageError(f"--quant-exclude {rx!r}: not a valid regular expression ({e})") from None
        self.smooth_alpha = a.smooth_alpha
        self.merge_lora = a.merge_lora
        self.gptq, self.auto_granularity = a.gptq, a.quant_auto_granularity
        self.weight_only = a.quant_weight_only
        self.accept_below_target = a.accept_below_target
        self.report_retention = a.report_retention
        if self.report_retention is not None and (self.report_retention < 0 or not self.quant):
            raise UsageError(f"--report-retention {self.report_retention}: a count >= 0, used with --fp8, --int8 or --int4")
        if self.accept_below_target and not self.quant:
            raise UsageError("--accept-below-target is only used with --fp8, --int8 or --int4")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise UsageError(f"--smooth-alpha {self.smooth_alpha}: must be between 0 and 1")
        if (self.exclude or self.auto_exclude or self.smooth_alpha is not None or self.merge_lora or self.gptq
                or self.weight_only) and not self.quant:
            raise UsageError("--quant-exclude / --quant-auto-exclude / --smooth-alpha / --merge-lora / --gptq / --quant-weight-only are only used with "
                             "--fp8, --int8 or --int4")
        if self.smooth_alpha is not None and self.calib is None:
            raise UsageError("--smooth-alpha measures activations on calibration text: pass --calib FILE or --calib builtin")
        if self.weight_only and not any(q in ("fp8", "int8") for q in self.quant):
            raise UsageError("--quant-weight-only applies to --fp8 / --int8 (int4 is always weight-only)")
        if self.gptq and self.calib is None:
            raise UsageError("--gptq needs the Hessians of calibration activations: pass --calib FILE or --calib builtin")
        if self.auto_granularity != "layer" and not self.auto_exclude:
            raise UsageError("--quant-auto-granularity only applies with --quant-auto-exclude")
        if self.auto_exclude and self.calib is None:
            raise UsageError("--quant-auto-exclude scores layers on calibration text: pass --calib FILE or --calib builtin")
        if self.quant and self.precision not in ("fp32", "auto"):
            raise UsageError("--fp8/--int8/--int4 quantize the fp32 graphs; drop --precision or use fp32")
        needs = [q for q in self.quant if q in ("fp8", "int8")]
        if needs and self.calib is None:
            raise UsageError(f"--{needs[0]} needs calibration data: pass --calib FILE (.txt/.jsonl) or --calib builtin "
                             "(random scales are a silent accuracy bug, so quantizing without data is refused)")
        if self.calib not in (None, "builtin") and not Path(self.calib).is_file():
            raise UsageError(f"--calib {self.calib}: no such file (or use --calib builtin)")
        if self.calib is not None and not self.quant:
            raise UsageError("--calib is only used with --fp8, --int8 or --int4")


class ShapeArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("shapes")
        g.add_argument("--max-chunk", type=int, default=None, metavar="N", help="largest injected chunk (default: config max_chunk)")
        g.add_argument("--max-prompt", type=int, default=None, metavar="N", help="largest prompt (default: config max_window)")
        g.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="most sequences one decode_batch call advances (runtime max_batch; default 16)")

    def parse(self, a):
        for k in ("max_chunk", "max_prompt", "max_batch"):
            v = getattr(a, k)
            if v is not None and v <= 0:
                raise UsageError(f"--{k.replace('_', '-')} must be > 0, got {v}")
        self.max_chunk, self.max_prompt, self.max_batch = a.max_chunk, a.max_prompt, a.max_batch


class ExportArgs(ArgGroup):
    def add(self, p):
        g = p.add_argument_group("export")
        g.add_argument("--opset", type=int, default=21, metavar="N", help="ONNX opset (>= 17; default 21)")
        g.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-torch validation")
        g.add_argument("--retrieval-op", choices=["standard", "plugin"], default="standard",
                       help="how the per-layer LTM retrieval is written: standard ONNX ops (default; any runtime) or "
                            "the mplus::TopKRetrieve + mplus::MemoryGather nodes of the TensorRT plugins "
                            "(docs/plugins.md; ONNX Runtime runs them lowered at load)")

    def parse(self, a):
        import onnx

        hi = onnx.defs.onnx_opset_version()
        if not 17 <= a.opset <= hi:
            raise UsageError(f"--opset {a.opset} is not supported; use 17..{hi} (21 recommended)")
        self.opset, self.validate = a.opset, not a.no_validate
        self.retrieval_op = a.retrieval_op


GROUPS = (ModelArgs, OutputArgs, PrecisionArgs, ShapeArgs, ExportArgs)


def build_parser(groups) -> argparse.ArgumentParser:
    return _build_parser("mplus-export", "Export an M+ / MemoryLLM model to ONNX graphs + manifest (docs/graphs.md).", groups)


def _fmt_bytes(n: int) -> str:
    for u in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or u == "GiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return str(n)


def print_report(report, console=None, shown: Path | None = None) -> None:
    """``shown``: the directory named in the title (the final OUT while the files are still staged)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 110)
    t = Table(title=f"mplus-export → {shown or report.out}")
    for c in ("graph", "size", "nodes", "max abs err", "tolerance", "export s", "validate s"):
        t.add_column(c, justify="left" if c == "graph" else "right")
    for g in report.graphs:
        size = (report.out / g.file).stat().st_size
        v = g.validation
        err = "-" if v is None else f"{v.max_abs:.2e}" + ("" if v.ok else " FAIL")
        tol = "-" if v is None else f"{v.tol:g}×scale"
        t.add_row(g.name, _fmt_bytes(size), str(g.nodes), err, tol, f"{g.export_s:.2f}", f"{g.validate_s:.2f}")
    t.add_row("weights.data", _fmt_bytes(report.weights_bytes), "", "", "", "", "")
    console.print(t)
    console.print(f"on disk: weights.data = {report.weights_ratio:.3f}×, weights.data + graphs = {report.size_ratio:.3f}× "
                  f"one copy of the weights ({_fmt_bytes(report.param_bytes)}); total {report.total_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Every option and input is checked first; the artifact is then built (export + quantization) in a hidden
    folder next to OUT and swapped onto OUT only when complete: a refused, failed or interrupted export
    leaves OUT exactly as it was."""
    groups = [G() for G in GROUPS]
    parser = build_parser(groups)
    a = parser.parse_args(argv)
    stage = None
    out = Path(a.output)
    try:
        parse_groups(groups, a)
        model_args, out_args, prec, shapes, exp = groups
        out = out_args.out
        model, tok = model_args.load()
        from mplus_deploy.model import MPlus
        from mplus_deploy.util.io import StagedDir

        from mplus_deploy.build import ValidationError, export_artifact

        cfg = model.config if isinstance(model, MPlus) else model.cfg
        check_shapes(cfg, shapes)
        if exp.retrieval_op == "plugin" and prec.quant:
            raise UsageError(f"--retrieval-op plugin with --{prec.quant[0]}: the quantizer runs on standard-op graphs "
                             "only; export the quantized artifact with the default --retrieval-op standard")
        if exp.retrieval_op == "plugin" and not cfg.is_mplus:
            raise UsageError("--retrieval-op plugin: this model has no long-term memory (MemoryLLM), so no retrieval "
                             "to write as plugins; drop the flag")
        plans = plan_quantization(prec)
        out_args.check_target()
        stage = StagedDir(out, tag="export")  # the first thing written: a hidden folder beside OUT
        work = stage.path
        t0 = time.perf_counter()
        try:
            precision = "fp32" if prec.quant and prec.precision == "auto" else prec.precision
            report = export_artifact(model, work, precision=precision, max_chunk=shapes.max_chunk,
                                     max_prompt=shapes.max_prompt, opset=exp.opset, validate=exp.validate,
                                     tokenizer=tok, log=_log, source=_source(model_args.src),
                                     retrieval_op=exp.retrieval_op, max_batch=shapes.max_batch)
        except ValidationError as e:
            msg = str(e).replace(str(work), str(out))
            if not os.path.lexists(out):  # nothing to lose: keep the failing artifact at OUT for inspection
                stage.commit()
                print(f"mplus-export: validation failed: {msg}", file=sys.stderr)
            else:
                msg = str(e).split("\n(artifact written to")[0]
                print(f"mplus-export: validation failed: {msg}\n(the existing {out} is kept as it was; export to a "
                      "new -o directory to inspect the failing graphs)", file=sys.stderr)
            return 1
        except ValueError as e:
            raise UsageError(str(e)) from None
        report.total_s = time.perf_counter() - t0
        print_report(report, shown=out)
        missed = []
        # the torch model is handed over, not kept: quantization releases it after its torch stage (Hessians,
        # sensitivity), so the accuracy report of the last mode runs without it (issue 21: peak RSS)
        held = [model if isinstance(model, MPlus) else str(model.path)]
        del model
        for k, (mode, opts, scheme) in enumerate(plans):
            from mplus_deploy.calibration import CalibrationError, quantize_artifact
            from mplus_deploy.calibration.quantize import Handoff

            _log(f"{mode}: scheme {scheme['name']} ({scheme['chosen_by']}: {scheme['reason']})")
            try:
                rep = quantize_artifact(work, mode=mode, calib=prec.calib,
                                        model=Handoff(held.pop()) if k == len(plans) - 1 else held[0],
                                        progress=sys.stderr.isatty() or os.environ.get("MPLUS_PROGRESS") == "1",
                                        scheme=scheme, log=_log, **opts)
            except (CalibrationError, ValueError) as e:
                raise UsageError(str(e).replace(str(work), str(out))) from None
            e2e = rep.get("end_to_end", {})
            verdict = "met" if rep.get("meets_target") else "MISSED"
            _log(f"{mode}: top-1 {e2e.get('top1_agreement', float('nan')):.4f} (target {rep.get('target', {}).get('top1_agreement')}: "
                 f"{verdict}); report: {out}/report/quantization.md")
            if not rep.get("meets_target"):
                missed.append(mode)
        if plans:
            _retarget_reports(work, out)
        stage.commit()
        if missed and not prec.accept_below_target:
            print(f"mplus-export: error: {', '.join(missed)} missed the report's top-1 target; the graphs are in "
                  f"{out} (manifest quantized.<mode>.report.meets_target = false). Try another scheme "
                  "(docs/quantization.md), or pass --accept-below-target to keep them and exit 0", file=sys.stderr)
            return 1
        return 0
    except UsageError as e:
        print(f"mplus-export: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"mplus-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mplus-export: interrupted; {out} is unchanged", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"mplus-export: error: {_os_error(e, out)}", file=sys.stderr)
        return 2
    finally:
        if stage is not None:
            stage.discard()


def _log(msg: str) -> None:
    """One line per export stage on stderr (shows in logs, not only on a terminal)."""
    print(f"mplus-export: {msg}", file=sys.stderr, flush=True)


def _source(src: str) -> dict:
    p = Path(src)
    return {"checkpoint": str(p.resolve())} if p.is_dir() else {"preset": src}


if __name__ == "__main__":
    sys.exit(main())
