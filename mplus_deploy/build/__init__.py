"""The steps ``mplus-export`` runs, as calls: export the graphs (``export``), validate them on the runtime's
executor (:mod:`.validate`), and quantize (``calibration``). This package sits above ``export`` and ``runtime``
(docs/design.md "Layers"), so neither of those imports the other."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .validate import GraphValidation, ValidationError, validate_artifact

__all__ = ["export_artifact", "GraphValidation", "ValidationError", "validate_artifact"]


def export_artifact(model, out: Path, validate: bool = True, log=None, **opts):
    """``export.exporter.write_artifact`` (same options), then, with ``validate``, every graph on the runtime's
    ``OrtRunner`` against the reference outputs the exporter stored. Returns the ``ExportReport`` with each
    graph's ``validation``; raises :class:`ValidationError` (the artifact stays in ``out`` for inspection)."""
    from mplus_deploy.export.exporter import write_artifact
    from mplus_deploy.util.machine import stage_logger

    t0 = time.perf_counter()
    report = write_artifact(model, out, cases=validate, log=log, **opts)
    if not validate:
        return report
    try:
        results = validate_artifact(report.out, report.cases_dir, log=stage_logger(log))
    finally:
        shutil.rmtree(report.cases_dir, ignore_errors=True)
        report.cases_dir = None
    for g in report.graphs:
        g.validation = results.get(g.name)
        g.validate_s = g.validation.seconds if g.validation else 0.0
    report.total_s = time.perf_counter() - t0
    return report
