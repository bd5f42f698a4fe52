"""Command-line tools (the top layer, docs/design.md "Layers"): ``mplus-export`` (:mod:`.export`, which runs
``build`` and ``calibration``). ``mplus-run`` and ``mplus-profile`` live beside their packages (``runtime.cli``,
``profiling.cli``)."""
