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
    assert plan["exclude_units"] in ([], ["layers.0.down_proj"]) and plan["sim_top1"] >= one
