"""ONNX export of M+ / MemoryLLM (docs/graphs.md, docs/design-export.md): one module per graph family,
the shared-weights artifact, its manifest, validation and the ``mplus-export`` CLI."""
from .manifest import ArtifactError, load_manifest, load_memory_state, write_manifest

__all__ = ["ArtifactError", "load_manifest", "load_memory_state", "write_manifest", "export_artifact"]


def export_artifact(*args, **kwargs):
    from .exporter import export_artifact as _export

    return _export(*args, **kwargs)
