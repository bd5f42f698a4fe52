"""Mixed-precision planning on the torch simulation (issue 7): which units to keep in fp32.

A *unit* is what the plan keeps or quantizes as one piece:

- ``granularity="layer"``: a whole decoder layer (``layers.3``: q/k/v/o, gate/up/down);
- ``granularity="unit"``: one group of a layer's linears that read the same activation — ``layers.3.qkv``
  (q/k/v, with the in-graph bos K/V projections), ``layers.3.o_proj``, ``layers.3.gate_up``,
  ``layers.3.down_proj`` — four per layer. Finer, so more of the model stays quantized at the same
  accuracy (on the demo the static-activation damage concentrates in a few ``down_proj`` / ``qkv``), at 4x
  the sensitivity runs.

:func:`unit_sensitivity` measures top-1 agreement with only unit *u* quantized, for every *u*;
:func:`plan_exclusions` keeps the most sensitive units in fp32 (fewest, found by bisection over the
sensitivity ranking) until the simulated top-1 agreement reaches ``target + margin``. It runs on the
*calibration* texts, never on the held-out report texts (no selection bias in the report).
"""
from __future__ import annotations

import re

from .sensitivity import TARGET_NAMES, Simulator

UNIT_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down_proj": ("down_proj",)}
_UNIT_RX = {"qkv": r"(?:bos/)?(?:q_proj|k_proj|v_proj)/", "o_proj": r"o_proj/", "gate_up": r"mlp/(?:gate_proj|up_proj)/",
            "down_proj": r"mlp/down_proj/"}
GRANULARITIES = ("layer", "unit")


def units(n_layers: int, granularity: str = "layer") -> dict[str, frozenset]:
    """Unit name → the module names (``layers.{i}.{name}``) it covers, in layer order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    out = {}
    for i in range(n_layers):
        if granularity == "layer":
            out[f"layers.{i}"] = frozenset(f"layers.{i}.{n}" for n in TARGET_NAMES)
        else:
            for g, names in UNIT_GROUPS.items():
                out[f"layers.{i}.{g}"] = frozenset(f"layers.{i}.{n}" for n in names)
    return out


def unit_pattern(unit: str) -> str:
    """ONNX node-name regex for the MatMuls of a unit (``/layers.3/...``, ``/layers.3/mlp/down_proj/...``)."""
    parts = unit.split(".")
    i = int(parts[1])
    if len(parts) == 2:
        return rf"^/layers\.{i}/"
    return rf"^/layers\.{i}/{_UNIT_RX[parts[2]]}"


def layer_patterns(layers) -> list[str]:
    """ONNX node-name regexes for the MatMuls of these decoder layers (``/layers.3/...``)."""
    return [unit_pattern(f"layers.{int(i)}") for i in sorted(layers)]


def matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def unit_sensitivity(sim: Simulator, table: dict[str, frozenset], progress: bool = False) -> list[float]:
    """Per unit: simulated top-1 agreement with only that unit quantized (lower = more sensitive)."""
    it = list(table.values())
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"sensitivity {sim.mode}", unit="unit")
    return [sim.top1(modules=set(mods)) for mods in it]


def plan_exclusions(sim: Simulator, target: float, margin: float = 0.01, sens: list[float] | None = None,
                    progress: bool = False, granularity: str = "layer") -> dict:
    """Fewest units (most sensitive first) to keep in fp32 so the simulated top-1 reaches target + margin.

    Bisection over the number n of excluded units along the sensitivity ranking (top-1 is close to
    monotone in n). The goal is ``target + margin``, the margin capped at half of ``1 - target``. Raises
    ``ValueError`` when even one quantized unit misses the goal (an artifact with nothing quantized would
    be a mislabelled fp32 one). → ``{"exclude_units", "exclude_layers" (layer granularity), "sim_top1",
    "sim_top1_all", "sensitivity", "units", "evaluations", ...}``.
    """
    table = units(len(sim.model.model.layers), granularity)
    names = list(table)
    sens = sens if sens is not None else unit_sensitivity(sim, table, progress)
    U = len(sens)
    order = sorted(range(U), key=lambda i: (sens[i], i))  # most harmful first
    goal = min(target + margin, target + 0.5 * (1.0 - target))  # the margin takes at most half the error budget
    cache: dict[int, float] = {}

    def top1(n: int) -> float:
        if n not in cache:
            cache[n] = 1.0 if n == U else sim.top1(modules=set().union(*(table[names[u]] for u in order[n:])))
        return cache[n]

    lo, hi = 0, U  # top1(hi) >= goal always (nothing quantized)
    if top1(0) >= goal:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if top1(mid) >= goal:
            hi = mid
        else:
            lo = mid
    if hi == U:
        raise ValueError(f"auto_exclude: no {granularity} can be quantized ({sim.mode}) and stay at simulated top-1 >= "
                         f"{goal:.3f}: the best single one reaches {max(sens):.4f}; lower the target margin, use another "
                         "mode, or choose layers with exclude patterns")
    kept = sorted(order[:hi])
    plan = {"granularity": granularity, "exclude_units": [names[u] for u in kept], "sim_top1": top1(hi),
            "sim_top1_all": top1(0), "goal": goal, "units": names, "sensitivity": [round(s, 4) for s in sens],
            "evaluations": len(cache) + U, "positions": sim.positions}
    if granularity == "layer":
        plan["exclude_layers"] = kept
    return plan


def plan_mixed_precision(model, enc, texts, mode: str, o, target: float, max_prompt: int, smoothing=None,
                         weights=None, progress: bool = False) -> dict:
    """``auto_exclude``: the units to keep fp32 (options ``o``: QuantOptions; ``weights``: GPTQ's, if used)."""
    n = min(o.sensitivity_tokens, o.max_tokens, max(2, max_prompt - o.greedy_tokens))
    scored, rest = texts[: o.sensitivity_texts], texts[o.sensitivity_texts :]
    sim = Simulator(model, enc, scored, mode, max_tokens=n, prompt_len=n, block_size=o.block_size,
                    scales=smoothing["scales"] if smoothing else None, calib_texts=rest or scored)
    sim.weights = weights
    sim.activations = not getattr(o, "weight_only", False)
    plan = plan_exclusions(sim, target, o.auto_margin, progress=progress, granularity=o.auto_granularity)
    plan["patterns"] = [unit_pattern(u) for u in plan["exclude_units"]]
    plan["texts"] = len(sim.texts)
    plan["amax_texts"] = len(rest) if rest else "the scored texts (no others given)"
    plan["layers"] = len(model.model.layers)
    plan["gptq"] = weights is not None
    plan["weight_only"] = not sim.activations
    return plan
