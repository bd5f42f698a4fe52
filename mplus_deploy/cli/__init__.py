"""Command-line tools (the top layer, docs/design.md "Layers"): ``mplus-export`` (:mod:`.export`, which runs
``build`` and ``calibration``), ``mplus-run`` (:mod:`.run`, the runtime) and ``mplus-profile``
(:mod:`.profile`, profiling). Their shared argument groups are :mod:`.args`."""
