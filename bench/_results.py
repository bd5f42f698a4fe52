"""Appending a bench's markdown to bench/RESULTS.md under its section heading (created when missing)."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append(text: str, head: str) -> None:
    body = RESULTS.read_text()
    RESULTS.write_text(body.rstrip("\n") + ("\n\n" if head in body else f"\n\n{head}\n\n") + text)


def publish(text: str, write: bool, head: str) -> None:
    """Print a bench's table; with ``write`` also append it to RESULTS.md under ``head``."""
    print(text)
    if write:
        append(text, head)
