"""The one error for an unusable artifact (or checkpoint source)."""
from __future__ import annotations


class ArtifactError(ValueError):
    """An artifact / checkpoint that cannot be used as is: the message names the file and what to fix;
    ``.files`` lists the offending files (relative to the artifact). Importable from ``mplus_deploy.artifact``
    and ``mplus_deploy.runtime``; a ``ValueError``, so the CLIs report it as bad input (exit 2)."""

    def __init__(self, msg: str, files: list[str] | None = None):
        super().__init__(msg)
        self.files = list(files or [])
