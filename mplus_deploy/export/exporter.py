"""``write_artifact``: model or checkpoint → OUT/ (graphs, shared weights, memory state, tokenizer, manifest),
and the validation cases (``cases.py``) that ``build.export_artifact`` replays on the runtime.

Streaming (issue 13; docs/design-export.md "Streaming export"): every graph family is traced on a
weightless skeleton (``weights.skeleton``), its parameter inputs are bound to external initializers
written one tensor at a time from the source (``bind.bind_weights``), so no proto ever holds a weight and
the exporter never holds the model. The validation cases come after: the reference model
(``WeightSource.reference``) computes every case's outputs into a scratch folder and is released; the graphs
are run on them later by ``build.validate`` (the runtime's executor: this package runs no graph). Peak RSS
is about one copy of the weights in the storage precision plus the largest temporary.
"""
from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch

from mplus_deploy.util.machine import stage_logger

from mplus_deploy.artifact import save_memory_state, write_manifest

from . import dedupe, families
from .bind import bind_weights
from .common import DEFAULT_OPSET, IO_PRECISION, PRECISIONS, Limits, derived_weights
from .trace import finish, trace
from .cases import write_case
from .plugin_nodes import check_retrieval_op
from .weights import WeightSource, skeleton, weight_source


@dataclass
class GraphReport:
    name: str
    file: str
    nodes: int
    export_s: float
    validation: object | None = None  # build.validate.GraphValidation, set by build.export_artifact
    validate_s: float = 0.0


@dataclass
class ExportReport:
    out: Path
    graphs: list[GraphReport] = field(default_factory=list)
    weights_bytes: int = 0
    onnx_bytes: int = 0
    param_bytes: int = 0
    total_s: float = 0.0
    precision: str = "fp32"
    cases_dir: Path | None = None  # the validation cases (``cases=True``), removed by whoever replays them

    @property
    def size_ratio(self) -> float:
        """(weights.data + all .onnx) / one copy of the model's parameters in the artifact precision."""
        return (self.weights_bytes + self.onnx_bytes) / max(1, self.param_bytes)

    @property
    def weights_ratio(self) -> float:
        """graphs/weights.data alone / one copy of the parameters (the graph protos excluded)."""
        return self.weights_bytes / max(1, self.param_bytes)


def resolve_precision(precision: str, src: WeightSource) -> str:
    """``auto``: the source's own float dtype (a bf16 checkpoint exports bf16 storage, nothing is lost)."""
    if precision == "auto":
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(src.dtype, "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS) + ['auto']}, got {precision!r}")
    return precision


def param_sources(wrapper, names: dict[int, str], src: WeightSource, cfg, dtype: torch.dtype | None = None) -> dict:
    """Graph input name (the wrapper's state-dict key) → (dedupe key, producer reading it from ``src``, converted
    to ``dtype`` while reading)."""
    derived = derived_weights(wrapper)
    out = {}
    for k, t in wrapper.state_dict(keep_vars=True).items():
        if id(t) in names:
            key = names[id(t)]
            out[k] = (key, lambda key=key: src.get(key, dtype))
        elif k in derived:
            key, make = derived[k]
            out[k] = (key, lambda make=make: make(src, dtype))
        elif k.endswith("rope.inv_freq"):
            continue
        else:
            raise RuntimeError(f"{type(wrapper).__name__}: parameter {k!r} has no weight source (not a checkpoint "
                               "tensor and not in derived_weights)")
    return out


def write_artifact(model, out: Path, precision: str = "fp32", max_chunk: int | None = None, max_prompt: int | None = None,
                   opset: int = DEFAULT_OPSET, cases: bool = True, tokenizer=None, progress: bool = False,
                   seed: int = 0, full_check: bool = True, source: dict | None = None,
                   log: Callable[[str], None] | None = None, retrieval_op: str = "standard",
                   max_batch: int | None = None) -> ExportReport:
    """``model``: an ``MPlus``, a checkpoint directory or a ``WeightSource``. ``precision``: fp32 | fp16 | bf16
    (bf16 storage, fp32 compute) | auto (the source's dtype). ``cases``: also write the validation cases
    (``report.cases_dir``). ``log``: one line per stage (default: none). ``retrieval_op``: "standard" (default,
    standard ONNX ops) or "plugin" (``mplus::TopKRetrieve`` + ``mplus::MemoryGather`` nodes, ``plugin_nodes``).
    Users call ``build.export_artifact``."""
    check_retrieval_op(retrieval_op)
    src = weight_source(model)
    precision = resolve_precision(precision, src)
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17..{onnx.defs.onnx_opset_version()} (21 recommended)")
    say = stage_logger(log)
    t_all = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = src.cfg
    limits = Limits.from_config(cfg, max_chunk, max_prompt, max_batch)
    storage, io_prec = PRECISIONS[precision], IO_PRECISION[precision]
    compute = PRECISIONS[io_prec]
    fams = families.families(cfg)
    report = ExportReport(out=out, precision=precision)
    graphs_dir = out / "graphs"
    bar = _bar(progress, len(fams) * (2 if cases else 1))
    skel, names = skeleton(cfg, compute)
    specs, custom = {}, {}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp, dedupe.WeightStore(graphs_dir) as store:
        for i, fam in enumerate(fams):
            spec = fam.spec(cfg, limits)
            t0 = time.perf_counter()
            wrapper = fam.build(skel)
            for m in wrapper.modules():
                if hasattr(m, "retrieval_op"):
                    m.retrieval_op = retrieval_op
            feeds = families.trace_feeds(spec, cfg, compute, seed)
            mp = trace(wrapper, families.export_args(spec, feeds), spec, Path(tmp) / f"{spec.name}.onnx")
            before = store.offset
            bind_weights(mp, param_sources(wrapper, names, src, cfg, storage), store, storage)
            mp = finish(mp, spec, opset)
            onnx.save_model(mp, str(graphs_dir / f"{spec.name}.onnx"))
            specs[spec.name] = spec
            custom[spec.name] = sorted({f"{n.domain}::{n.op_type}" for n in mp.graph.node if n.domain == "mplus"})
            dt = time.perf_counter() - t0
            report.graphs.append(GraphReport(spec.name, f"graphs/{spec.name}.onnx", len(mp.graph.node), dt))
            say(f"[{i + 1}/{len(fams)}] {spec.name}: {len(mp.graph.node)} nodes, +{(store.offset - before) / 2**20:.1f} MiB "
                f"of weights ({store.offset / 2**20:.1f} MiB in all), {dt:.1f} s")
            del mp, wrapper
            _tick(bar, f"export {spec.name}")
    del skel
    stats = store.stats()
    report.param_bytes = _param_bytes(cfg, storage)
    report.weights_bytes = (graphs_dir / dedupe.WEIGHTS_FILE).stat().st_size
    report.onnx_bytes = sum((out / g.file).stat().st_size for g in report.graphs)
    for g in report.graphs:
        onnx.checker.check_model(str(out / g.file), full_check=full_check)
    say(f"onnx.checker: {len(report.graphs)} graphs ok")
    if cases:
        report.cases_dir = _write_cases(report, src, specs, limits, precision, seed, say, bar)
    if bar:
        bar.close()
    # memory state (in the graphs' float I/O precision), tokenizer, manifest
    mem = src.memory(compute)
    mem_info = save_memory_state(out, mem)
    mem_section = _memory_section(cfg, mem, limits, io_prec, mem_info)
    del mem
    tok_files = []
    if tokenizer is not None:
        tok_dir = out / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        tok_files = sorted(p.relative_to(out).as_posix() for p in tok_dir.rglob("*") if p.is_file())
    graphs = {g.name: specs[g.name].to_manifest(precision, g.file, opset) for g in report.graphs}
    for g in report.graphs:
        graphs[g.name]["weights_dtype"] = str(storage).replace("torch.", "")
        if custom[g.name]:
            graphs[g.name]["custom_ops"] = custom[g.name]  # runners: lower (ORT) or register plugins (TensorRT)
    write_manifest(out, cfg, graphs, precision, opset, mem_section, tok_files, extra={
        "source": source or {},
        "retrieval_op": retrieval_op,
        "limits": {"max_chunk": limits.max_chunk, "max_prompt": limits.max_prompt, "max_ltm": limits.max_ltm,
                   "max_rows": limits.max_rows, "max_batch": limits.max_batch},
        "weights": {"file": "graphs/weights.data", "bytes": report.weights_bytes, "unique_tensors": stats["unique_tensors"],
                    "dtype": str(storage).replace("torch.", ""), "compute_dtype": str(compute).replace("torch.", ""),
                    "onnx_bytes": report.onnx_bytes, "param_bytes": report.param_bytes,
                    "size_ratio": round(report.size_ratio, 4), "weights_ratio": round(report.weights_ratio, 4)},
    })
    report.total_s = time.perf_counter() - t_all
    say(f"graphs written in {report.total_s:.1f} s")
    return report


def _write_cases(report, src, specs, limits, precision, seed, say, bar) -> Path:
    """Reference outputs for every case (the reference model alone in memory), one safetensors file per case
    in a scratch folder of OUT (removed by the caller after replaying them); the model is released after."""
    t0 = time.perf_counter()
    ref = src.reference(PRECISIONS[precision])
    saved_mode = ref.retrieval_score_dtype
    if precision != "fp32":
        ref.retrieval_score_dtype = "fp32"  # the graphs score in fp32 (docs/graphs.md)
    spill = Path(tempfile.mkdtemp(prefix=".validate-", dir=report.out))
    big = report.param_bytes >= TRIM_FROM
    try:
        n = 0
        for fam in families.families(src.cfg):
            if fam.name in specs:
                for i, (f, r) in enumerate(fam.cases(ref, limits, seed)):  # one case in memory at a time
                    write_case(spill, fam.name, i, f, r())
                    n += 1
                    del f, r
                    _trim(big)
                say(f"validation: reference outputs of {fam.name}")
                _tick(bar, f"cases {fam.name}")
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    finally:
        ref.retrieval_score_dtype = saved_mode
    del ref
    src.release()
    _trim(big)
    say(f"validation: reference outputs of {n} cases in {time.perf_counter() - t0:.1f} s")
    return spill


TRIM_FROM = 256 << 20  # weights bytes from which validation collects and trims between cases


def _trim(big: bool) -> None:
    """Collect, and hand freed heap pages back to the OS (glibc keeps large freed blocks otherwise: the
    next stage's peak would stack on the last one's). Skipped for small models, where it is only time."""
    if not big:
        return
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="mplus-export", unit="step", file=sys.stderr)


def _tick(bar, what: str) -> None:
    if bar:
        bar.set_postfix_str(what)
        bar.update(1)


def _param_bytes(cfg, dtype: torch.dtype) -> int:
    """One copy of the model's parameters in ``dtype`` (counted on the meta skeleton, no weights)."""
    from mplus_deploy.model.checkpoint import build_meta

    m = build_meta(cfg)
    seen, n = set(), 0
    item = torch.empty((), dtype=dtype).element_size()
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * (item if p.dtype.is_floating_point else p.element_size())
    return n


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
