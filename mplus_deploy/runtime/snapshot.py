"""Memory snapshots (spec §2): one safetensors file, written atomically (locked temp file + fsync +
rename; temp files of killed saves are removed by the next save of the same target), no pickle.
Tensors hold the whole ``HostMemory`` (STM hidden rows, ages and K/V; LTM and pending in K/V form with
retriever keys, ages and rf); the header metadata (JSON) holds the scalars, the model
config it belongs to and the drop-RNG state (``generator.get_state()``), so a restored memory draws
the same drops as the original would have.

Both directions stream (docs/runtime.md "Memory at paper scale"): ``save`` writes tensor by tensor
straight from the live buffers (K/V rows are re-laid-out to the file's ``[rows, k|v]`` form through
one bounded chunk, never a whole tensor), ``load`` validates the whole header, every shape, dtype and
metadata field before allocating anything, then reads with ``readinto`` into freshly allocated owned
buffers through the same open file (nothing is memory-mapped, so truncating or rewriting the file later
cannot touch a loaded memory; a rewrite in place during the load is detected and refused).

On-disk format: ``mplus-deploy-memory`` v1, unchanged (files written before streaming load, and the
other way round): ``stm`` [L, N, d], ``stm_ages`` [L, N] f64, ``stm_k``/``stm_v`` [L, Hkv, N, Dh],
``stm_written`` [L, N] bool, ``stm_keys`` [L, N, d_r] (M+), per layer ``ltm_kv.{l}`` [S_l, 2*Hkv*Dh]
(k then v per row), ``ltm_keys.{l}`` [S_l, d_r], ``ltm_ages.{l}``/``ltm_rf.{l}`` [S_l] f64, and with
pending rows ``pend_kv`` [L, n_p, 2*Hkv*Dh], ``pend_keys`` [L, n_p, d_r], ``pend_ages`` [L, n_p] f64.

This module owns the format, save/load semantics and validation; the crash-safe file I/O (atomic writer
with locked temp files, stale-temp cleanup, the one-open-file header check and reader) is ``snapshot_io``.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.safetensors_io import _ST_TO_TORCH, _TORCH_TO_ST, header_bytes  # noqa: F401

from .memory import HostMemory, HostState, new_store
from .snapshot_io import (
    SnapshotError,
    _bytes,
    _header,
    _identity,
    nbytes,
    _open,
    _Reader,
    atomic_write,
    remove_stale_temps,  # noqa: F401 (re-exported)
    temp_files,  # noqa: F401 (re-exported)
    temp_pattern,  # noqa: F401 (re-exported)
)

FORMAT = "mplus-deploy-memory"
FORMAT_VERSION = 1
META_KEY = "mplus_deploy.memory"
# Config fields that do not change what a memory state means (serving limits, bookkeeping).
_IGNORED_FIELDS = {"max_window", "max_chunk", "extra", "torch_dtype", "transformers_version", "_name_or_path"}
CHUNK_BYTES = 64 << 20  # bound on a save/load re-layout or dtype-conversion temporary


def _cfg_dict(cfg: MPlusConfig) -> dict:
    d = cfg.to_dict()
    d.pop("mplus_deploy", None)
    return {k: v for k, v in d.items() if k not in _IGNORED_FIELDS}


# ====================================================================================== save
def _emit(f, t: torch.Tensor) -> int:
    """Write one contiguous piece of a tensor's data; returns its byte count."""
    if t.numel():
        f.write(_bytes(t.contiguous()))
    return t.numel() * t.element_size()


def _whole(t: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
    return lambda: iter((t,))


def _kv_rows(mem: HostMemory, l: int, a: int, b: int) -> Iterator[torch.Tensor]:
    """Layer l's store rows [a, b) as file rows [n, 2*Hkv*Dh] (k then v), a bounded chunk at a time."""
    s, cfg = mem.store, mem.cfg
    H, D = cfg.num_key_value_heads, cfg.dh
    step = max(1, CHUNK_BYTES // (2 * H * D * s.k.element_size()))
    buf = torch.empty(min(step, max(b - a, 1)), 2, H, D, dtype=s.k.dtype)
    for r in range(a, b, step):
        c = min(step, b - r)
        t = buf[:c]
        t[:, 0].copy_(s.k[l, :, r: r + c].transpose(0, 1))
        t[:, 1].copy_(s.v[l, :, r: r + c].transpose(0, 1))
        yield t.view(c, 2 * H * D)


def _entries(mem: HostMemory) -> list:
    """(name, dtype, shape, zero-arg callable yielding the data in pieces) for every snapshot tensor."""
    st, cfg = mem.state, mem.cfg
    e = [(n, t.dtype, tuple(t.shape), _whole(t)) for n, t in (
        ("stm", st.stm), ("stm_ages", st.stm_ages), ("stm_k", mem.stm_k), ("stm_v", mem.stm_v),
        ("stm_written", mem.stm_written))]
    if mem.stm_keys is not None:
        e.append(("stm_keys", mem.stm_keys.dtype, tuple(mem.stm_keys.shape), _whole(mem.stm_keys)))
    s = st.store
    if s is None:
        return e
    W, dr = 2 * cfg.num_key_value_heads * cfg.dh, cfg.selector_hidden_dim
    for l in range(s.L):
        m = s.merged[l]
        e.append((f"ltm_kv.{l}", s.dtype, (m, W), lambda l=l, m=m: _kv_rows(mem, l, 0, m)))
        e.append((f"ltm_keys.{l}", s.dtype, (m, dr), _whole(s.keys[l, :m])))
        e.append((f"ltm_ages.{l}", torch.float64, (m,), _whole(s.ages[l, :m])))
        e.append((f"ltm_rf.{l}", torch.float64, (m,), _whole(s.rf[l, :m])))
    n_p = s.n_pending
    if n_p:
        rows = [(s.merged[l], s.valid[l]) for l in range(s.L)]
        e.append(("pend_kv", s.dtype, (s.L, n_p, W),
                  lambda: (t for l, (a, b) in enumerate(rows) for t in _kv_rows(mem, l, a, b))))
        e.append(("pend_keys", s.dtype, (s.L, n_p, dr), lambda: (s.keys[l, a:b] for l, (a, b) in enumerate(rows))))
        e.append(("pend_ages", torch.float64, (s.L, n_p), lambda: (s.ages[l, a:b] for l, (a, b) in enumerate(rows))))
    return e


def write_streamed(path: Path, entries: list, metadata: dict[str, str]) -> None:
    """A safetensors file from ``entries`` (name, dtype, shape, callable yielding contiguous pieces whose
    bytes, in order, are the tensor's C-order data), atomically. Holds at most one piece at a time."""
    hb = header_bytes(entries, metadata)

    def writer(f):
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, dtype, shape, pieces in entries:
            want, got = nbytes(dtype, shape), 0
            for t in pieces():
                if t.dtype != dtype:
                    raise ValueError(f"snapshot tensor {name}: piece of dtype {t.dtype}, declared {dtype}")
                got += _emit(f, t)
            if got != want:
                raise ValueError(f"snapshot tensor {name}: wrote {got} bytes, declared {want}")

    atomic_write(Path(path), writer)


def save(mem: HostMemory, path, weights_id: str | None = None) -> Path:
    st = mem.state
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": _cfg_dict(mem.cfg), "weights_id": weights_id,
        "kv_form": "pre-RoPE W_dec k|v rows (spec R1/R2)",
        "update_step": st.update_step, "initialized": bool(st.initialized),
        "ltm_age_dtype": list(st.ltm_age_dtype), "short_chunk_warned": bool(st.short_chunk_warned),
        "version": st.version, "num_ltm_layers": 0 if st.store is None else st.store.L,
        "rng_state": base64.b64encode(st.generator.get_state().numpy().tobytes()).decode("ascii"),
    }
    path = Path(path)
    write_streamed(path, _entries(mem), {META_KEY: json.dumps(meta)})
    return path


# ====================================================================================== load
@dataclass
class _Plan:
    """A fully validated snapshot: where every tensor is, what it will become. Nothing allocated yet."""
    path: Path
    tensors: dict  # name -> (dtype, shape, absolute offset, nbytes)
    meta: dict
    merged: list
    n_pending: int
    rng: torch.Tensor


def inspect(path, cfg: MPlusConfig, weights_id: str | None = None) -> _Plan:
    """Validate a snapshot against ``cfg`` (header, metadata, every tensor's shape and dtype) without
    reading its data. Raises ``SnapshotError`` naming the bad field; ``load`` runs the same checks first."""
    path = Path(path)
    with _open(path) as fh:
        return _inspect(path, fh, cfg, weights_id)


def _inspect(path: Path, fh, cfg: MPlusConfig, weights_id: str | None) -> _Plan:
    try:
        h, _ = _header(path, fh)
    except OSError as e:
        raise SnapshotError(f"{path}: not a readable safetensors memory snapshot ({e})") from None
    raw = h["metadata"].get(META_KEY)
    if raw is None:
        raise SnapshotError(f"{path}: safetensors file without '{META_KEY}' metadata: not a memory snapshot "
                            "written by Engine.save_memory")
    try:
        meta = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path}: metadata '{META_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path}: metadata '{META_KEY}' is not a JSON object")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {meta.get('format')!r} v{meta.get('format_version')} is not "
                            f"supported (this runtime reads {FORMAT!r} v{FORMAT_VERSION})")
    want, got = _cfg_dict(cfg), meta.get("config") or {}
    if not isinstance(got, dict):
        raise SnapshotError(f"{path}: metadata field 'config' is not a JSON object")
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        shown = ", ".join(f"{k}: snapshot {got.get(k)!r} vs model {want.get(k)!r}" for k in diff[:6])
        raise SnapshotError(f"{path}: this memory snapshot belongs to another model config ({shown}"
                            f"{' …' if len(diff) > 6 else ''}); load it into an engine for that model")
    if meta.get("weights_id") is not None and not isinstance(meta["weights_id"], str):
        raise SnapshotError(f"{path}: metadata field 'weights_id' is {meta['weights_id']!r}, expected a string "
                            "(the sha256 identity of the weights) or null")
    snap_id = meta.get("weights_id")
    # A snapshot without an id (torch backend on a preset / checkpoint: fp32 weights) may go into an fp32
    # engine, not into one running quantized graphs (``MODE:…`` ids, ``Source.weights_id_for``).
    if weights_id and (snap_id or ":" in weights_id) and weights_id != snap_id:
        shown = f"{snap_id[:12]}…" if snap_id else "fp32 weights without an id"
        raise SnapshotError(f"{path}: the snapshot's memory K/V were projected with other weights "
                            f"({shown} vs {weights_id[:12]}…); load it into an engine on the artifact it came "
                            "from with the same quantized= mode (an 'int4:…' id: quantized='int4'; a bare id: "
                            "the fp32 graphs)")
    L = cfg.num_hidden_layers
    n_ltm = L if cfg.is_mplus else 0

    def field(name, kind, default=None):
        v = meta.get(name, default)
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        if not ok:
            raise SnapshotError(f"{path}: metadata field {name!r} is {v!r}, expected "
                                f"{'true/false' if kind is bool else 'an integer >= 0'}")
        return v

    field("update_step", int), field("initialized", bool), field("version", int, 0)
    field("short_chunk_warned", bool, False)
    if field("num_ltm_layers", int, 0) != n_ltm:
        raise SnapshotError(f"{path}: metadata field 'num_ltm_layers' is {meta.get('num_ltm_layers')!r}, "
                            f"the model has {n_ltm} LTM layers")
    ad = meta.get("ltm_age_dtype") or []
    if not (isinstance(ad, list) and len(ad) in (0, n_ltm) and all(x in ("int32", "float64") for x in ad)):
        raise SnapshotError(f"{path}: metadata field 'ltm_age_dtype' is {ad!r}, expected {n_ltm} of 'int32'/'float64'")
    rng = _rng_state(path, meta.get("rng_state"))

    t = h["tensors"]
    H, D, N, d, dr = cfg.num_key_value_heads, cfg.dh, cfg.N, cfg.hidden_size, cfg.selector_hidden_dim
    W = 2 * H * D

    def need(name, shape, dtype=None, floating=False):
        if name not in t:
            raise SnapshotError(f"{path}: snapshot is missing tensor '{name}'")
        dt, sh = t[name][0], t[name][1]
        if len(sh) != len(shape) or any(w is not None and w != g for w, g in zip(shape, sh)):
            shown = "[" + ", ".join("S" if w is None else str(w) for w in shape) + "]"
            raise SnapshotError(f"{path}: tensor '{name}' has shape {list(sh)}, the model needs {shown}")
        if (dtype is not None and dt != dtype) or (floating and not dt.is_floating_point):
            raise SnapshotError(f"{path}: tensor '{name}' has dtype {dt}, expected "
                                f"{dtype if dtype is not None else 'a floating dtype'}")
        return sh

    need("stm", (L, N, d), floating=True)
    need("stm_ages", (L, N), torch.float64)
    need("stm_written", (L, N), torch.bool)
    kv_dtype = t["stm_k"][0] if "stm_k" in t else None
    need("stm_k", (L, H, N, D), floating=True)
    need("stm_v", (L, H, N, D), kv_dtype)
    if cfg.is_mplus:
        need("stm_keys", (L, N, dr), floating=True)
    merged = []
    for l in range(n_ltm):
        S = need(f"ltm_kv.{l}", (None, W), kv_dtype)[0]
        need(f"ltm_keys.{l}", (S, dr), floating=True)
        need(f"ltm_ages.{l}", (S,), torch.float64)
        need(f"ltm_rf.{l}", (S,), torch.float64)
        merged.append(S)
    n_p = 0
    if n_ltm and "pend_kv" in t:
        n_p = need("pend_kv", (L, None, W), kv_dtype)[1]
        need("pend_keys", (L, n_p, dr), floating=True)
        need("pend_ages", (L, n_p), torch.float64)
    return _Plan(path, t, meta, merged, n_p, rng)


def _rng_state(path: Path, raw) -> torch.Tensor:
    ref = torch.Generator(device="cpu").get_state()
    try:
        b = base64.b64decode(raw if isinstance(raw, str) else "\0", validate=True)
    except (binascii.Error, ValueError):
        raise SnapshotError(f"{path}: metadata field 'rng_state' is not base64 (the drop-RNG state)") from None
    if len(b) != ref.numel():
        raise SnapshotError(f"{path}: metadata field 'rng_state' holds {len(b)} bytes, a CPU generator state "
                            f"has {ref.numel()}")
    state = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    try:
        torch.Generator(device="cpu").set_state(state)
    except RuntimeError as e:
        raise SnapshotError(f"{path}: metadata field 'rng_state' is not a valid CPU generator state ({e})") from None
    return state


def _read(plan: _Plan, fh, cfg: MPlusConfig, max_ltm_rows: int | None) -> HostMemory:
    meta, r = plan.meta, _Reader(plan, fh, CHUNK_BYTES)
    try:
        g = torch.Generator(device="cpu")
        g.set_state(plan.rng)
        st = HostState(cfg, r.new("stm"), r.new("stm_ages"), None, g, meta["update_step"], meta["initialized"],
                       meta.get("version", 0), meta.get("short_chunk_warned", False), meta.get("ltm_age_dtype") or [])
        stm_k, stm_v, written = r.new("stm_k"), r.new("stm_v"), r.new("stm_written")
        stm_keys = r.new("stm_keys") if cfg.is_mplus else None
        if plan.merged:
            L, n_p = len(plan.merged), plan.n_pending
            s = new_store(cfg, L, stm_k.dtype, plan.merged, n_p, max_ltm_rows)
            dr = cfg.selector_hidden_dim
            for l, m in enumerate(plan.merged):
                r.kv_rows(f"ltm_kv.{l}", 0, s.k[l, :, :m], s.v[l, :, :m])
                r.into(f"ltm_keys.{l}", s.keys[l, :m])
                r.into(f"ltm_ages.{l}", s.ages[l, :m])
                r.into(f"ltm_rf.{l}", s.rf[l, :m])
                if n_p:
                    r.kv_rows("pend_kv", l * n_p, s.k[l, :, m: m + n_p], s.v[l, :, m: m + n_p])
                    r.into("pend_keys", s.keys[l, m: m + n_p], first=l * n_p * dr)
                    r.into("pend_ages", s.ages[l, m: m + n_p], first=l * n_p)
            s.set_lengths(plan.merged, [m + n_p for m in plan.merged])
            st.store = s
    finally:
        r.close()
    return HostMemory(cfg, st, stm_k, stm_v, stm_keys, written)


def load(path, cfg: MPlusConfig, weights_id: str | None = None, max_ltm_rows: int | None = None) -> HostMemory:
    """A new ``HostMemory`` from a snapshot: everything is validated (``inspect``'s checks) before any buffer
    is allocated or any data read; the data then lands in buffers this process owns (``readinto`` tensor
    by tensor, nothing memory-mapped), so truncating or rewriting the file afterwards cannot touch the
    loaded memory. Header and data come through one open file: a save that renames a new file onto
    ``path`` meanwhile does not mix two snapshots, and an in-place rewrite during the load is detected
    (size / mtime / ctime changed) and refused."""
    path = Path(path)
    with _open(path) as fh:
        before = _identity(fh)
        plan = _inspect(path, fh, cfg, weights_id)
        try:
            mem = _read(plan, fh, cfg, max_ltm_rows)
        except OSError as e:
            raise SnapshotError(f"{plan.path}: reading the snapshot failed ({e})") from None
        if _identity(fh) != before:
            raise SnapshotError(f"{path}: the file was modified while it was read (another process writing it "
                                "in place?); load it again once the writer is done (save_memory replaces "
                                "files atomically, so load snapshots that it wrote)")
    return mem
