"""Runtime: ``Engine`` (memorize / generate / sessions / memory snapshots) over torch, ONNX Runtime
or TensorRT runners, with a host-side memory manager (spec §13.2)."""
from mplus_deploy.artifact import ArtifactError
from .backends import BackendUnavailable
from .engine import Engine, EngineClosed, Session
from .memory import HostMemory
from .snapshot import SnapshotError

__all__ = ["Engine", "EngineClosed", "Session", "HostMemory", "ArtifactError", "BackendUnavailable", "SnapshotError"]
