"""Argument groups shared by the command-line tools (Polygraphy's ``tools/args`` pattern).

Every group has one protocol: ``add(parser)`` adds its flags in its own argparse group, ``parse(args)``
validates them (raising ``UsageError``) and keeps what the tool needs as attributes, and a group that
builds an object has a method for it (``BackendArgs.options``, ``SamplingArgs.params``). A tool lists its
groups and calls :func:`parse_groups`; ``main`` turns a ``UsageError`` into ``PROG: error: …`` and exit 2.

Shared here: ``ArtifactArgs`` (the artifact and how to open it: mplus-run, mplus-serve), ``BackendArgs`` (``--backend/--device/--threads``: mplus-run, mplus-profile),
``SamplingArgs`` (``--max-new-tokens/--do-sample/--temperature/--top-p/--top-k/--sample-seed``: mplus-run,
mplus-serve to come), ``check_writable`` (every output flag). Tool-specific groups live in their tool's
module (``cli/export.py``, ``cli/run.py``, ``cli/profile.py``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from mplus_deploy.util.io import write_error

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
DEVICES = ("cpu", "cuda")


class UsageError(Exception):
    """A bad command line or input; printed without a traceback, exit code 2."""


class ArgGroup:
    """Base of the groups: ``add`` the flags, ``parse`` (validate and keep) them."""

    def add(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def parse(self, a: argparse.Namespace) -> None:
        raise NotImplementedError


def build_parser(prog: str, description: str, groups) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    for g in groups:
        g.add(p)
    return p


def parse_groups(groups, a: argparse.Namespace) -> None:
    """Every group's ``parse`` in order (the first ``UsageError`` stops)."""
    for g in groups:
        g.parse(a)


def parse_or_usage(prog: str, groups, a: argparse.Namespace) -> int | None:
    """``parse_groups``; on a ``UsageError`` print it as ``prog: error: ...`` and return the exit code 2."""
    try:
        parse_groups(groups, a)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return None


class ArtifactArgs(ArgGroup):
    """The positional artifact path, ``--quantized`` and ``--tokenizer``; ``build`` opens the ``Engine``."""

    def add(self, p) -> None:
        g = p.add_argument_group("model")
        g.add_argument("path", help="exported artifact directory (manifest.json); for --backend torch also a "
                                    "checkpoint directory or a preset name")
        g.add_argument("--quantized", choices=["fp8", "int8", "int4"], default=None,
                       help="run the artifact's quantized graphs of this mode (onnxruntime; from mplus-export --fp8/--int8/--int4)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the artifact's tokenizer/)")

    def parse(self, a) -> None:
        self.path, self.quantized, self.tokenizer = a.path, a.quantized, a.tokenizer

    def engine_options(self, backend: BackendArgs, seed: int | None, max_batch: int = 1) -> dict:
        """The ``Engine(path, **options)`` keyword options these flags ask for."""
        extra = {"quantized": self.quantized} if self.quantized else {}
        return {"seed": seed, "tokenizer": self.tokenizer, "max_batch": max_batch, **backend.options(), **extra}

    def build(self, backend: BackendArgs, seed: int | None, max_batch: int = 1):
        from mplus_deploy.runtime import Engine

        return Engine(self.path, **self.engine_options(backend, seed, max_batch))


class BackendArgs(ArgGroup):
    """``--backend``, ``--device``, ``--threads``: which runner executes the graphs (``runtime.Engine``)."""

    def add(self, p):
        g = p.add_argument_group("backend")
        g.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="graph executor (auto: tensorrt on cuda when its engines exist, else onnxruntime)")
        g.add_argument("--device", default="cpu", choices=DEVICES)
        g.add_argument("--threads", type=int, default=None, metavar="N",
                       help="intra-op threads (default: the backend's own choice)")

    def parse(self, a):
        if a.threads is not None and a.threads <= 0:
            raise UsageError(f"--threads {a.threads}: must be >= 1 (or omit it for the backend's default)")
        self.backend, self.device, self.threads = a.backend, a.device, a.threads

    def options(self) -> dict:
        """The ``Engine`` keyword options these flags ask for."""
        return {"backend": self.backend, "device": self.device, "threads": self.threads}


class SamplingArgs(ArgGroup):
    """Generation flags → one ``model.sampling.SamplingParams`` (validated by it, reported as usage errors)."""

    def add(self, p):
        g = p.add_argument_group("sampling")
        g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="tokens to generate (default 256)")
        g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
        g.add_argument("--temperature", type=float, default=1.0)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
        g.add_argument("--sample-seed", type=int, default=None, help="seed of the sampling generator")

    def parse(self, a):
        from mplus_deploy.model.sampling import SamplingParams

        try:
            self.params = SamplingParams.of(None, a.max_new_tokens, do_sample=a.do_sample, temperature=a.temperature,
                                            top_p=a.top_p, top_k=a.top_k, seed=a.sample_seed)
        except ValueError as e:
            flag = str(e).split(" ")[0].replace("_", "-")
            raise UsageError(f"--{flag}: {e}") from None


def check_writable(path, flag: str, fix: str = "write it to a writable directory") -> None:
    """Before any work: ``path`` is not a directory, its folder exists, and a file can be created there
    (nothing is left behind)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; name a file in it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist (create it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(write_error(e, flag, path, fix)) from None


INPUT_ERRORS = (UsageError, ValueError, RuntimeError, FileNotFoundError)  # ArtifactError, BackendUnavailable, ...


def report_error(prog: str, e: BaseException, path) -> int:
    """Print an input / environment error of ``prog`` without a traceback; the exit code (2)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        print(f"{prog}: error: {getattr(e, 'filename', None) or path}: {e.strerror or e}", file=sys.stderr)
    else:
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
