from tests.profiling.conftest import tiny_art  # noqa: F401 (the tiny artifact mplus-profile runs on)
