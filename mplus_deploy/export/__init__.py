"""ONNX export of M+ / MemoryLLM (docs/graphs.md, docs/design-export.md): one module per graph family, the
shared-weights artifact written through ``mplus_deploy.artifact``, and the validation cases. It runs no graph:
``build.export_artifact`` validates the graphs on the runtime, ``cli.export`` is the ``mplus-export`` CLI."""
from mplus_deploy.artifact import ArtifactError

__all__ = ["ArtifactError", "write_artifact"]


def write_artifact(*args, **kwargs):
    from .exporter import write_artifact as _write

    return _write(*args, **kwargs)
