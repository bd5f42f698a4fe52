"""Unit-granularity mixed precision: unit tables, node-name patterns, planning."""
import onnx
import pytest

from mplus_deploy.calibration.data import encoder, load_texts
from mplus_deploy.calibration.mixed import plan_exclusions, unit_pattern, units, matches
from mplus_deploy.calibration.quantize import QuantOptions, select_nodes
from mplus_deploy.calibration.sensitivity import Simulator
from mplus_deploy.model import MPlus, preset


def test_unit_table():
    t = units(2, "unit")
    assert list(t) == [f"layers.{i}.{g}" for i in range(2) for g in ("qkv", "o_proj", "gate_up", "down_proj")]
    assert t["layers.1.qkv"] == {"layers.1.q_proj", "layers.1.k_proj", "layers.1.v_proj"}
    assert set().union(*t.values()) == set().union(*units(2, "layer").values())
    with pytest.raises(ValueError, match="granularity"):
        units(2, "head")


def test_unit_patterns_select_their_matmuls(calib_tiny_art):
    names = {}
    for g in ("prefill", "memory_update", "decode"):
        m = onnx.load(str(calib_tiny_art / "graphs" / f"{g}.onnx"), load_external_data=False)
        names[g], _ = select_nodes(m, QuantOptions())
    pre = names["prefill"]
    qkv = {n for n in pre if matches(n, [unit_pattern("layers.1.qkv")])}
    assert qkv == {"/layers.1/q_proj/base_layer/MatMul", "/layers.1/k_proj/base_layer/MatMul",
                   "/layers.1/v_proj/base_layer/MatMul", "/layers.1/bos/k_proj/base_layer/MatMul",
                   "/layers.1/bos/v_proj/base_layer/MatMul"}
    for g, sel in names.items():  # the four units of a layer partition that layer's quantizable MatMuls
        layer = {n for n in sel if matches(n, [unit_pattern("layers.0")])}
        parts = [{n for n in sel if matches(n, [unit_pattern(u)])} for u in units(1, "unit")]
        assert set().union(*parts) == layer and sum(map(len, parts)) == len(layer), g
        assert {n for n in sel if matches(n, [unit_pattern("layers.0.down_proj")])} == {"/layers.0/mlp/down_proj/base_layer/MatMul"}


def test_plan_units_keeps_the_most_sensitive():
    model = MPlus.from_config(preset("tiny"), seed=5)
    sim = Simulator(model, encoder(None, model.config.vocab_size), load_texts("builtin", 3), "int4", max_tokens=40,
                    prompt_len=24)
    sens = [0.99, 0.98, 0.97, 0.2, 0.99, 0.99, 0.99, 0.5]  # layers.0.down_proj, then layers.1.down_proj
    with pytest.raises(ValueError, match="no unit can be quantized"):
        plan_exclusions(sim, target=1.0, margin=0.0, sens=sens, granularity="unit")
    all_q = plan_exclusions(sim, target=0.0, margin=0.0, sens=sens, granularity="unit")
    assert all_q["exclude_units"] == [] and "exclude_layers" not in all_q and len(all_q["units"]) == 8
    one = sim.top1(modules=set().union(*(m for u, m in units(2, "unit").items() if u != "layers.0.down_proj")))
    plan = plan_exclusions(sim, target=one, margin=0.0, sens=sens, granularity="unit")
    # the seeded simulation (measured: all 8 units quantized 0.889, all but layers.0.down_proj 0.931): the goal
    # is missed with everything quantized, so exactly the most sensitive unit is kept
    assert plan["sim_top1_all"] < one < 1.0
    assert plan["exclude_units"] == ["layers.0.down_proj"] and plan["sim_top1"] == one and plan["goal"] == one


class FakeSim:
    """A stand-in ``Simulator`` with a known top-1: 1 - the damage of every quantized unit (monotone)."""

    mode, positions = "int4", 100

    def __init__(self, damage: dict, n_layers: int, granularity: str):
        from types import SimpleNamespace

        self.table = units(n_layers, granularity)
        self.damage = damage
        self.model = SimpleNamespace(model=SimpleNamespace(layers=[None] * n_layers))
        self.calls = []

    def top1(self, modules=frozenset()):
        self.calls.append(frozenset(modules))
        return 1.0 - sum(d for u, d in self.damage.items() if self.table[u] & set(modules))


@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_plan_exclusions_on_a_known_sensitivity(granularity):
    """Bisection on a constructed simulation: the fewest most-damaging units are kept, any wrong order or
    off-by-one changes the answer."""
    if granularity == "layer":
        damage = {"layers.0": 0.05, "layers.1": 0.20, "layers.2": 0.01, "layers.3": 0.10}
    else:  # 2 layers x 4 units
        damage = dict(zip(units(2, "unit"), (0.05, 0.004, 0.02, 0.20, 0.01, 0.10, 0.006, 0.03)))
    n_layers = 4 if granularity == "layer" else 2
    by_harm = sorted(damage, key=lambda u: (-damage[u], list(damage).index(u)))  # most damaging first
    sim = FakeSim(damage, n_layers, granularity)
    names = list(damage)
    for target, margin in ((0.5, 0.0), (0.85, 0.0), (0.85, 0.02), (0.9, 0.2), (0.95, 0.0)):
        goal = min(target + margin, target + 0.5 * (1 - target))
        # the answer by exhaustion: the smallest n such that keeping the n most damaging reaches the goal
        n = next(n for n in range(len(names) + 1) if 1.0 - sum(damage[u] for u in by_harm[n:]) >= goal - 1e-12)
        plan = plan_exclusions(sim, target=target, margin=margin, granularity=granularity)
        want = sorted(by_harm[:n], key=names.index)
        assert plan["exclude_units"] == want, (target, margin)
        assert plan["sim_top1"] == pytest.approx(1.0 - sum(damage[u] for u in by_harm[n:]))
        assert plan["sim_top1_all"] == pytest.approx(1.0 - sum(damage.values()))
        assert plan["goal"] == pytest.approx(goal) and plan["sensitivity"] == [round(1 - damage[u], 4) for u in names]
        if granularity == "layer":
            assert plan["exclude_layers"] == [int(u.split(".")[1]) for u in want]
    assert plan_exclusions(sim, target=0.85, granularity=granularity)["exclude_units"] == (
        ["layers.1", "layers.3"] if granularity == "layer" else ["layers.0.down_proj", "layers.1.o_proj"])
    top = 1.0 - min(damage.values())  # the best a plan with one quantized unit can do
    with pytest.raises(ValueError, match=f"no {granularity} can be quantized"):
        plan_exclusions(sim, target=min(1.0, top + 0.001), margin=0.0, granularity=granularity)
