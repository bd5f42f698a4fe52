"""PyTorch reference of M+ / MemoryLLM (the definition of correct for every other backend)."""
from .config import PRESETS, ConfigError, MPlusConfig, preset
from .memory import MemoryState
from .mplus import MPlus

__all__ = ["MPlus", "MPlusConfig", "MemoryState", "ConfigError", "PRESETS", "preset"]
from .checkpoint import CheckpointError, load, save  # noqa: E402  (issue 3)
from .presets import resolve  # noqa: E402
__all__ += ["load", "save", "resolve", "CheckpointError"]
