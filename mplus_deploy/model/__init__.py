"""PyTorch reference of M+ / MemoryLLM (the definition of correct for every other backend)."""
from .config import PRESETS, ConfigError, MPlusConfig, preset
from .memory import MemoryState
from .mplus import MPlus

__all__ = ["MPlus", "MPlusConfig", "MemoryState", "ConfigError", "PRESETS", "preset"]
