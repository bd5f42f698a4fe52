"""One graph's quantization pass (the loop body of ``quantize.quantize_artifact``): the scheme's steps on one
fp32 graph of the artifact (direct weight-only Q/DQ, our asymmetric int4, or a staged copy through LoRA
folding, smoothing and ModelOpt), GPTQ rounding, then ``per_graph.finish`` (checks and the shared writer)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from .data import CalibrationError
from .per_graph import ArtifactWeights, finish, int4_grid_hint, summarize, tick
from .steps import run_modelopt, stage_graph


def lm_heads(qm, sel: list, o, entry: dict, base_dir) -> list:
    """``rtn_asym`` with ``quantize_lm_head``: the lm_head at ``o.lm_head_bits`` (4: this grid, like every other
    MatMul; 8: the Q8_0 grid of :mod:`.q8_blocks`, as llama.cpp stores a Q4_1 model's output matrix), done here
    for an 8-bit untied head and for a tied head (which reads the embedding table in place: its own copy).
    → the selected MatMuls left for the 4-bit pass."""
    if not o.quantize_lm_head:
        return sel
    from .asym_int4 import apply_tied_lm_head
    from .quantize import PATTERNS

    rest = sel
    if o.lm_head_bits == 8:
        from . import q8_blocks

        heads = [n for n in sel if PATTERNS["lm_head"].search(n)]
        rest = [n for n in sel if n not in heads]
        if heads:
            entry["lm_head_int8"] = q8_blocks.apply(qm, heads, o.block_size, o.int4_accuracy_level, base_dir=base_dir)
    tied = apply_tied_lm_head(qm, o.block_size, o.int4_accuracy_level, base_dir=base_dir, bits=o.lm_head_bits)
    entry["tied_lm_head_int8" if o.lm_head_bits == 8 else "tied_lm_head_int4"] = tied
    return rest


@dataclass
class GraphPass:
    """What every graph's pass shares: the artifact, the scheme and the stages' results."""
    out: Path
    man: dict
    mode: str
    o: object  # QuantOptions
    method: str
    direct: bool
    cap: dict | None
    smoothing: dict | None
    hessians: dict | None
    gptq_cache: object
    writer: object
    section: dict
    tmp: Path
    n_graphs: int
    say: object
    bar: object = None

    def run(self, gi: int, g: str) -> None:
        from . import capture as cap_mod
        from .quantize import select_nodes

        out, man, mode, o, method, direct = self.out, self.man, self.mode, self.o, self.method, self.direct
        cap, smoothing, hessians, gptq_cache = self.cap, self.smoothing, self.hessians, self.gptq_cache
        writer, section, tmp, say, bar, graphs = self.writer, self.section, self.tmp, self.say, self.bar, range(self.n_graphs)
        t_g = time.perf_counter()
        say(f"[{gi + 1}/{len(graphs)}] {g}: quantizing")
        src = out / man["graphs"][g]["file"]
        m0 = onnx.load(str(src), load_external_data=False)
        sel, excl = select_nodes(m0, o)
        if bar:
            bar.set_postfix_str(g)
        entry = {"source": man["graphs"][g]["file"], "selected": len(sel), "excluded": summarize(excl)}
        if not sel:
            entry["skipped"] = "no quantizable MatMul"
            section["graphs"][g] = entry
            return
        feeds = cap["feeds"].get(g) if cap else None
        reader = cap_mod.FeedReader(feeds) if feeds else None
        if reader is None and mode != "int4" and not direct:
            raise CalibrationError(f"no calibration samples for graph {g}")
        dst = Path(tmp) / f"{g}.{mode}.onnx"
        g_method = method if (reader is not None or method in ("rtn_dq", "rtn_asym")) else "rtn_dq"
        if direct and not (o.merge_lora or smoothing is not None):  # the artifact's weights as they are
            qm = onnx.load(str(src), load_external_data=False)
            fp32 = ArtifactWeights(qm, src.parent, sel)
            from .weight_dq import apply as dq_apply

            entry["weight_only_matmuls"] = dq_apply(qm, sel, mode, fp32.by_initializer)
            g_method, base_dir = "weight_dq", src.parent
            if hessians is not None:
                from . import gptq as gptq_mod

                entry["gptq_weights"] = gptq_mod.apply(qm, fp32, hessians, mode, cache=gptq_cache)
            finish(qm, entry, writer, g, base_dir, m0, sel, excl, feeds, g_method, section)
            del qm, fp32
            tick(say, bar, f"[{gi + 1}/{len(graphs)}] {g}: {entry['quantized_nodes']} MatMuls ({g_method}) in "
                  f"{time.perf_counter() - t_g:.1f} s")
            return
        if g_method == "rtn_asym" and smoothing is None:  # our own pass, from the artifact's weights
            from .asym_int4 import apply as asym_apply
            from mplus_deploy.artifact.lora_merge import merge

            qm, folded = onnx.load(str(src), load_external_data=False), None
            if o.merge_lora:  # the folded weights are built one at a time, as the quantizer reads them
                entry["lora_merged"], folded = merge(qm, sel, base_dir=src.parent, defer=True)
            rest = lm_heads(qm, sel, o, entry, src.parent)
            asym_apply(qm, rest, o.block_size, o.int4_accuracy_level, base_dir=src.parent, weights=folded)
            stubs = [i.name for i in qm.graph.initializer if folded is not None and i.name in folded]
            if stubs:
                raise AssertionError(f"int4 rtn_asym: folded weights left unquantized in {g}: {stubs[:3]}")
            finish(qm, entry, writer, g, src.parent, m0, sel, excl, feeds, g_method, section)
            del qm
            tick(say, bar, f"[{gi + 1}/{len(graphs)}] {g}: {entry['quantized_nodes']} MatMuls ({g_method}) in "
                  f"{time.perf_counter() - t_g:.1f} s")
            return
        staged = stage_graph(src, Path(tmp))
        if o.merge_lora:
            from mplus_deploy.artifact.lora_merge import merge_file

            entry["lora_merged"] = merge_file(staged, sel)
        if smoothing is not None:
            from .smooth import apply_file

            entry["smoothed_matmuls"] = apply_file(staged, smoothing["scales"], sel)
        if mode == "int4" and g_method != "rtn_asym" and "hints" not in section:
            section["hints"] = int4_grid_hint(staged, sel, o.block_size)
        if direct:  # smoothing / LoRA folding changed the staged weights: quantize those
            from .weight_dq import apply as dq_apply

            qm = onnx.load(str(staged), load_external_data=True)
            inits_s = {i.name: i for i in qm.graph.initializer}
            entry["weight_only_matmuls"] = dq_apply(qm, sel, mode, lambda w: numpy_helper.to_array(inits_s[w]))
            g_method = "weight_dq"
        elif g_method == "rtn_asym":  # our own pass: ModelOpt has no asymmetric float-offset int4 (asym_int4.py)
            from .asym_int4 import apply as asym_apply

            qm = onnx.load(str(staged), load_external_data=True)
            asym_apply(qm, lm_heads(qm, sel, o, entry, ""), o.block_size, o.int4_accuracy_level)
        else:
            run_modelopt(staged, dst, mode, sel, list(excl), reader, g_method, o)
            qm = onnx.load(str(dst), load_external_data=True)
        if o.weight_only and not direct:
            from .weight_only import strip_activation_qdq

            entry["weight_only_matmuls"] = strip_activation_qdq(qm, sel)
        if hessians is not None:
            from . import gptq as gptq_mod

            entry["gptq_weights"] = gptq_mod.apply(qm, gptq_mod.staged_weights(staged, sel), hessians, mode,
                                                   cache=gptq_cache)
        finish(qm, entry, writer, g, dst.parent, m0, sel, excl, feeds, g_method, section)
        del qm
        tick(say, bar, f"[{gi + 1}/{len(graphs)}] {g}: {entry['quantized_nodes']} MatMuls ({g_method}) in "
              f"{time.perf_counter() - t_g:.1f} s")
