"""``export_artifact``: reference model → OUT/ (graphs, shared weights, memory state, tokenizer, manifest).

Steps: export every graph family (TorchScript, opset converted to ``opset``), dedupe all initializers
into ``graphs/weights.data``, ``onnx.checker`` (full_check), validate each graph in onnxruntime CPU
against the torch reference, write the memory state, the tokenizer and ``manifest.json``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from . import dedupe, families, manifest
from .common import DEFAULT_OPSET, PRECISIONS, Limits, cast_model, torchscript_export
from .validate import GraphValidation, ValidationError, compare, ort_session


@dataclass
class GraphReport:
    name: str
    file: str
    nodes: int
    export_s: float
    validation: GraphValidation | None = None
    validate_s: float = 0.0


@dataclass
class ExportReport:
    out: Path
    graphs: list[GraphReport] = field(default_factory=list)
    weights_bytes: int = 0
    onnx_bytes: int = 0
    param_bytes: int = 0
    total_s: float = 0.0

    @property
    def size_ratio(self) -> float:
        """(weights.data + all .onnx) / one copy of the model's parameters in the artifact precision."""
        return (self.weights_bytes + self.onnx_bytes) / max(1, self.param_bytes)

    @property
    def weights_ratio(self) -> float:
        """graphs/weights.data alone / one copy of the parameters (the graph protos excluded)."""
        return self.weights_bytes / max(1, self.param_bytes)


def _param_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def export_artifact(model, out: Path, precision: str = "fp32", max_chunk: int | None = None, max_prompt: int | None = None,
                    opset: int = DEFAULT_OPSET, validate: bool = True, tokenizer=None, progress: bool = False,
                    seed: int = 0, full_check: bool = True, source: dict | None = None) -> ExportReport:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17..{onnx.defs.onnx_opset_version()} (21 recommended)")
    t_all = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    limits = Limits.from_config(cfg, max_chunk, max_prompt)
    m = cast_model(model, precision)
    if precision != "fp32":
        m.retrieval_score_dtype = "fp32"  # the graphs score in fp32 (docs/graphs.md)
    fams = families.families(cfg)
    report = ExportReport(out=out, param_bytes=_param_bytes(m))
    graphs_dir = out / "graphs"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(fams) * (2 if validate else 1), desc="mplus-export", unit="step")
    specs, cases = {}, {}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp, dedupe.WeightStore(graphs_dir) as store:
        for fam in fams:
            spec = fam.spec(cfg, limits)
            if bar:
                bar.set_postfix_str(f"export {spec.name}")
            t0 = time.perf_counter()
            cs = fam.cases(m, limits, seed)
            raw = Path(tmp) / f"{spec.name}.onnx"
            mp = torchscript_export(fam.build(m), families.export_args(spec, cs[0][0]), spec, raw, opset)
            for f in Path(tmp).iterdir():  # the exporter's own external data, now loaded in mp
                f.unlink()
            store.add(spec.name, mp)
            specs[spec.name], cases[spec.name] = spec, cs
            report.graphs.append(GraphReport(spec.name, f"graphs/{spec.name}.onnx", len(mp.graph.node), time.perf_counter() - t0))
            del mp
            if bar:
                bar.update(1)
    stats = store.stats()
    report.weights_bytes = (graphs_dir / dedupe.WEIGHTS_FILE).stat().st_size
    report.onnx_bytes = sum((out / g.file).stat().st_size for g in report.graphs)
    for g in report.graphs:
        path = out / g.file
        onnx.checker.check_model(str(path), full_check=full_check)
        if validate:
            if bar:
                bar.set_postfix_str(f"validate {g.name}")
            t0 = time.perf_counter()
            if PRECISIONS[precision] == torch.bfloat16:
                g.validation = compare(g.name, None, specs[g.name], cases[g.name], precision)
            else:
                g.validation = compare(g.name, ort_session(path), specs[g.name], cases[g.name], precision)
            g.validate_s = time.perf_counter() - t0
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    # memory state, tokenizer, manifest
    mem_info = manifest.save_memory_state(out, model.memory)
    tok_files = []
    if tokenizer is not None:
        tok_dir = out / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        tok_files = sorted(p.relative_to(out).as_posix() for p in tok_dir.rglob("*") if p.is_file())
    mem_section = _memory_section(cfg, model.memory, limits, precision, mem_info)
    graphs = {g.name: specs[g.name].to_manifest(precision, g.file, opset) for g in report.graphs}
    for g in report.graphs:
        if g.validation is not None:
            graphs[g.name]["validation"] = {
                "tolerance": g.validation.tol, "cases": g.validation.cases, "skipped": g.validation.skipped,
                "max_abs": {o.name: o.max_abs for o in g.validation.outputs.values()},
            }
    manifest.write_manifest(out, cfg, graphs, precision, opset, mem_section, tok_files, extra={
        "source": source or {},
        "limits": {"max_chunk": limits.max_chunk, "max_prompt": limits.max_prompt, "max_ltm": limits.max_ltm,
                   "max_rows": limits.max_rows},
        "weights": {"file": "graphs/weights.data", "bytes": report.weights_bytes, "unique_tensors": stats["unique_tensors"],
                    "onnx_bytes": report.onnx_bytes, "param_bytes": report.param_bytes,
                    "size_ratio": round(report.size_ratio, 4), "weights_ratio": round(report.weights_ratio, 4)},
    })
    report.total_s = time.perf_counter() - t_all
    failures = [f for g in report.graphs if g.validation for f in g.validation.failures()]
    if failures:
        raise ValidationError("exported graphs disagree with the reference:\n  - " + "\n  - ".join(failures)
                              + f"\n(artifact written to {out} for inspection)")
    return report


def _memory_section(cfg, mem, limits, precision, info) -> dict:
    item = torch.finfo(PRECISIONS[precision]).bits // 8
    d, Hkv, Dh, L = cfg.hidden_size, cfg.num_key_value_heads, cfg.dh, cfg.num_hidden_layers
    return {
        "L": L, "K": cfg.K, "N": cfg.N, "K0": cfg.K0, "P": cfg.prefix_len, "d": d, "d_r": cfg.selector_hidden_dim if cfg.is_mplus else 0,
        "Hkv": Hkv, "Dh": Dh,
        "bytes_per_row": {"hidden": d * item, "kv": 2 * Hkv * Dh * item, "key": (cfg.selector_hidden_dim * item) if cfg.is_mplus else 0},
        "stm_bytes": {"hidden": L * cfg.N * d * item, "kv": L * cfg.N * 2 * Hkv * Dh * item},
        "ltm_rows": [int(t.shape[0]) for t in mem.ltm], "pending_rows": mem.n_pending,
        "max_ltm_rows": limits.max_ltm,
        "files": ["memory/initial.safetensors", "memory/initial.json"], **{"initial": info},
    }


def prepare_out(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True)
