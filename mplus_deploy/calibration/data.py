"""Calibration and held-out texts.

``--calib FILE``: ``.txt`` (paragraphs separated by blank lines) or ``.jsonl`` (one ``{"text": ...}`` object
per line). ``--calib builtin``: the small general-English corpus shipped in the package
(``mplus_deploy/data/calib_builtin.txt``, 44 paragraphs) - a fallback for demos and CI, not a substitute
for text from the deployment domain.

The held-out evaluation text (``heldout_eval.txt`` next to this module, 24 paragraphs) is never used
for calibration; :func:`heldout_texts` drops any paragraph that also appears in the calibration set.

Tokenization: the artifact's tokenizer when it has one; otherwise (random-weight presets such as
``tiny``/``small``) a deterministic byte tokenizer ``id = byte % vocab_size`` so calibration still sees
real, text-shaped id sequences.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mplus_deploy.util.io import jsonl_objects

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "calib_builtin.txt"
HELDOUT_PATH = Path(__file__).resolve().parent / "heldout_eval.txt"


class CalibrationError(ValueError):
    """Missing, empty or unreadable calibration data (quantization refuses to invent scales)."""


def _paragraphs(text: str) -> list[str]:
    out, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def load_texts(calib, max_samples: int | None = None) -> list[str]:
    """``calib`` = ``"builtin"`` | path to ``.txt``/``.jsonl`` | list of strings → list of texts (capped)."""
    if calib is None:
        raise CalibrationError(
            "fp8/int8 quantization needs calibration data: pass --calib FILE (.txt paragraphs or .jsonl "
            "{\"text\": ...}) or --calib builtin (small general-English fallback corpus); without it the "
            "activation scales would be random (a silent accuracy bug)")
    if isinstance(calib, (list, tuple)):
        texts = [str(t) for t in calib if str(t).strip()]
        src = "list"
    else:
        p = BUILTIN_PATH if str(calib) == BUILTIN else Path(calib)
        src = str(p)
        if not p.is_file():
            raise CalibrationError(f"calibration file {p} does not exist (pass a .txt or .jsonl file, or 'builtin')")
        raw = p.read_text(encoding="utf-8", errors="replace")
        if p.suffix == ".jsonl":
            texts = []
            try:
                objs = list(jsonl_objects(p, raw))
            except ValueError as e:
                raise CalibrationError(str(e)) from None
            for i, obj in objs:
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CalibrationError(f"{p}:{i}: expected an object with a string field \"text\"")
                if obj["text"].strip():
                    texts.append(obj["text"].strip())
        else:
            texts = _paragraphs(raw)
    if not texts:
        raise CalibrationError(f"calibration data {src} contains no text")
    if max_samples is not None:
        texts = texts[: max(1, int(max_samples))]
    return texts


def heldout_texts(exclude: list[str] | None = None) -> list[str]:
    ex = {" ".join(t.split()) for t in (exclude or [])}
    return [t for t in _paragraphs(HELDOUT_PATH.read_text(encoding="utf-8")) if " ".join(t.split()) not in ex]


class ByteTokenizer:
    """Fallback for artifacts without a tokenizer: utf-8 bytes modulo the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([b % self.vocab_size for b in text.encode("utf-8")], dtype=torch.int64)


def encoder(tokenizer, vocab_size: int):
    """→ ``f(text) -> LongTensor [T]`` (no special tokens, spec §3.1)."""
    if tokenizer is None:
        return ByteTokenizer(vocab_size).encode
    from mplus_deploy.model.tokenizer import encode_memory

    return lambda text: encode_memory(tokenizer, text)


def load_artifact_tokenizer(out: Path):
    d = Path(out) / "tokenizer"
    if not d.is_dir() or not any(d.iterdir()):
        return None
    from mplus_deploy.model.tokenizer import load_tokenizer

    return load_tokenizer(d)
