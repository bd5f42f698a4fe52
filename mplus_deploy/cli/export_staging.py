"""What ``mplus-export`` checks before it writes and does to the staged artifact before the swap (cli.py has
the command line and ``main``).

Before the staging folder exists: ``check_shapes`` (--max-chunk / --max-prompt against the model's
limits) and ``plan_quantization`` (every requested mode's options and scheme, checked as
``quantize_artifact`` will check them), so a refused option costs nothing. After the build, before the
swap: ``_retarget_reports`` makes the quantization reports name OUT instead of the staging folder. On
failure: ``_os_error`` turns an ``OSError`` into a message that says what to do and that OUT is unchanged.
``UsageError`` (exit code 2) is raised here and by the argument groups.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from mplus_deploy.util.io import write_error

from .args import UsageError


def quant_options(prec, mode: str) -> dict:
    """The ``quantize_artifact`` options the command line asks for, before the mode's default scheme."""
    opts = {}
    if prec.calib_method:
        opts["calib_method"] = prec.calib_method
    if prec.quantize_lm_head:
        opts["quantize_lm_head"] = True
    bits = getattr(prec, "lm_head_bits", None)
    if bits is not None and mode == "int4":  # the lm_head grids of rtn_asym (q8_blocks.py, asym_int4.py)
        opts["quantize_lm_head"] = bits != 32
        if bits != 32:
            opts["lm_head_bits"] = bits
    if prec.calib_samples:
        opts["max_samples"] = prec.calib_samples
    if prec.exclude:
        opts["exclude"] = tuple(prec.exclude)
    if prec.auto_exclude:
        opts["auto_exclude"] = True
    if prec.smooth_alpha is not None:
        opts["smooth_alpha"] = prec.smooth_alpha
    if prec.merge_lora:
        opts["merge_lora"] = True
    if prec.gptq:
        opts["gptq"] = True
    if getattr(prec, "report_retention", None) is not None:
        opts["retention_facts"] = prec.report_retention
    if prec.weight_only and mode != "int4":  # int4 is weight-only already
        opts["weight_only"] = True
    if prec.auto_granularity != "layer":
        opts["auto_granularity"] = prec.auto_granularity
    return opts


def plan_quantization(prec) -> list[tuple[str, dict, dict]]:
    """[(mode, options, scheme record)] for every requested mode, every combination checked as
    ``quantize_artifact`` will check it, so a refused combination is refused before anything is written."""
    from mplus_deploy.calibration import schemes
    from mplus_deploy.calibration.quantize import QuantOptions

    plans = []
    for mode in prec.quant:
        try:
            opts, scheme = schemes.choose(mode, quant_options(prec, mode), prec.calib is not None)
        except ValueError as e:
            raise UsageError(str(e)) from None
        o = QuantOptions(**opts)
        method = o.method(mode, prec.calib is not None)
        if mode in ("fp8", "int8") and method not in ("max", "entropy"):
            raise UsageError(f"--{mode} --calib-method {method}: fp8/int8 calibrate with max or entropy "
                             "(the other methods are int4 ones)")
        if mode == "int4" and method not in ("awq_clip", "awq_lite", "rtn_dq", "rtn_asym"):
            raise UsageError(f"--int4 --calib-method {method}: int4 uses rtn_dq, rtn_asym, awq_clip or awq_lite")
        if method == "rtn_asym" and (o.gptq or o.auto_exclude):
            raise UsageError(f"--{mode} with rtn_asym (the default int4 scheme or --calib-method rtn_asym) does not "
                             "combine with --gptq / --quant-auto-exclude (both simulate ModelOpt's symmetric grid): "
                             "drop them, use --quant-exclude REGEX for mixed precision, or pick --calib-method rtn_dq")
        plans.append((mode, opts, scheme))
    return plans


def check_shapes(cfg, shapes) -> None:
    """--max-chunk / --max-prompt against the model's own limits (config max_chunk / max_window)."""
    from mplus_deploy.export.common import Limits

    if shapes.max_chunk is not None and shapes.max_chunk > cfg.max_chunk:
        raise UsageError(f"--max-chunk {shapes.max_chunk} exceeds the model's injection chunk max_chunk={cfg.max_chunk} "
                         f"(memorize never feeds longer chunks); pass a value in [{cfg.K}, {cfg.max_chunk}] or omit it")
    if shapes.max_prompt is not None and shapes.max_prompt > cfg.max_window:
        raise UsageError(f"--max-prompt {shapes.max_prompt} exceeds the model's generation window max_window="
                         f"{cfg.max_window}; pass a value in [1, {cfg.max_window}] or omit it")
    try:
        Limits.from_config(cfg, shapes.max_chunk, shapes.max_prompt)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _os_error(e: OSError, out: Path) -> str:
    where = getattr(e, "filename", None) or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return write_error(e, f"-o {out}: writing", where, "choose another -o directory") + f" ({out} is unchanged)"
    if isinstance(e, FileNotFoundError):
        return f"missing file: {e.filename or e}"
    return f"{where}: {e.strerror or e}; OUT {out} is unchanged"


def _retarget_reports(work: Path, out: Path) -> None:
    """The quantization reports name the folder they were made in (the staging folder): name OUT instead,
    and update their sha256 in the manifest."""
    import json

    from mplus_deploy.util.io import atomic_write_text, sha256_file

    from mplus_deploy.artifact import MANIFEST

    pairs = sorted({(os.path.abspath(work), os.path.abspath(out)), (str(work), str(out))}, key=lambda p: -len(p[0]))
    man_path = work / MANIFEST
    man = json.loads(man_path.read_text())
    changed = False
    for f in sorted((work / "report").glob("*")) if (work / "report").is_dir() else []:
        if not f.is_file() or f.suffix not in (".json", ".md", ".txt"):
            continue
        text = f.read_text(encoding="utf-8")
        new = text
        for a, b in pairs:
            new = new.replace(json.dumps(a)[1:-1], json.dumps(b)[1:-1]) if f.suffix == ".json" else new.replace(a, b)
        if new != text:
            mode = f.stat().st_mode & 0o777
            atomic_write_text(f, new)
            os.chmod(f, mode)
            rel = f.relative_to(work).as_posix()
            if rel in man.get("files", {}):
                man["files"][rel] = sha256_file(f)
                changed = True
    if changed:
        mode = man_path.stat().st_mode & 0o777
        atomic_write_text(man_path, json.dumps(man, indent=2) + "\n")
        os.chmod(man_path, mode)
