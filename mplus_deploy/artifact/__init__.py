"""The artifact contract (docs/graphs.md): what ``mplus-export`` writes and everything else reads.

- :mod:`.manifest`: ``manifest.json`` (format version, sha256 of every file, graph entries, limits, the
  quantized sections), written and read only here;
- :mod:`.memory_files`: the initial memory state (``memory/initial.*``);
- :mod:`.graph_io`: how host feeds map onto graph inputs, the decode-cache names, TensorRT profile shapes;
- :mod:`.source`: what an engine opens (artifact, checkpoint, preset, ``MPlus``), one preset/``demo`` rule.

Imports only ``mplus_deploy.model`` and ``mplus_deploy.util`` (tests/test_layering.py): ``export`` writes
through it, ``runtime``/``calibration``/``profiling`` read through it, and neither side imports the other.
"""
from .errors import ArtifactError
from .manifest import (FORMAT_VERSION, MANIFEST, config_from_manifest, graph_info, graph_path, hash_files, load_manifest,
                       record_validation, update_quantized, write_manifest)
from .memory_files import load_memory_state, save_memory_state

__all__ = ["ArtifactError", "FORMAT_VERSION", "MANIFEST", "config_from_manifest", "graph_info", "graph_path",
           "hash_files", "load_manifest", "load_memory_state", "record_validation", "save_memory_state", "update_quantized",
           "write_manifest"]
