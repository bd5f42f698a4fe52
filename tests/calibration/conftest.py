"""The quantized tiny artifacts (``calib_tiny_art``, ``fp8_art``, ``int8_art``, ``int4_art``) live in tests/conftest.py,
shared with tests/runtime (the torch backend reads their quantized weights)."""
from ..conftest import FAST  # noqa: F401
