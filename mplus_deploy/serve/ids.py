"""Memory ids (the OpenAI ``user`` field, the ``{id}`` of the memory routes): one rule, and ids never reach a
path raw. A valid id is 1-128 characters of ``A-Z a-z 0-9 . _ - @ :``, starting with a letter or digit; its
files are named by the SHA-256 of the id (``file_stem``), so no id can name, escape or collide with a path."""
from __future__ import annotations

import hashlib
import re

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


class BadMemoryId(ValueError):
    """An id outside ``ID_RE``."""


def check_memory_id(mid) -> str:
    if not isinstance(mid, str) or not ID_RE.fullmatch(mid):
        shown = repr(mid)[:60]
        raise BadMemoryId(f"memory id {shown} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ - @ :, "
                          "starting with a letter or digit")
    return mid


def file_stem(mid: str) -> str:
    """The file-name stem of an id's snapshots (hex, fixed length; the id itself is stored in the index)."""
    return hashlib.sha256(check_memory_id(mid).encode("utf-8")).hexdigest()[:40]
