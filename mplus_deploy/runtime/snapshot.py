"""Memory snapshots (spec §2): one safetensors file, written atomically (temp file + fsync + rename),
no pickle. Tensors hold the whole ``HostMemory`` (STM hidden rows, ages and K/V; LTM and pending in
K/V form with retriever keys, ages and rf); the header metadata (JSON) holds the scalars, the model
config it belongs to and the drop-RNG state (``generator.get_state()``), so a restored memory draws
the same drops as the original would have.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import MemoryState
from mplus_deploy.util.io import atomic_replace_from

from .memory import HostMemory

FORMAT = "mplus-deploy-memory"
FORMAT_VERSION = 1
META_KEY = "mplus_deploy.memory"
# Config fields that do not change what a memory state means (serving limits, bookkeeping).
_IGNORED_FIELDS = {"max_window", "max_chunk", "extra", "torch_dtype", "transformers_version", "_name_or_path"}


class SnapshotError(ValueError):
    """A snapshot that cannot be restored into this engine; the message says why."""


def _cfg_dict(cfg: MPlusConfig) -> dict:
    d = cfg.to_dict()
    d.pop("mplus_deploy", None)
    return {k: v for k, v in d.items() if k not in _IGNORED_FIELDS}


def save(mem: HostMemory, path, weights_id: str | None = None) -> Path:
    st = mem.state
    t = {"stm": st.stm, "stm_ages": st.stm_ages, "stm_k": mem.stm_k, "stm_v": mem.stm_v,
         "stm_written": mem.stm_written}
    if mem.stm_keys is not None:
        t["stm_keys"] = mem.stm_keys
    for l in range(len(st.ltm)):
        t[f"ltm_kv.{l}"], t[f"ltm_keys.{l}"] = st.ltm[l], st.ltm_keys[l]
        t[f"ltm_ages.{l}"], t[f"ltm_rf.{l}"] = st.ltm_ages[l], st.ltm_rf[l]
    if st.pend_vals is not None:
        t["pend_kv"], t["pend_keys"], t["pend_ages"] = st.pend_vals, st.pend_keys, st.pend_ages
    t = {k: v.detach().cpu().contiguous() for k, v in t.items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": _cfg_dict(mem.cfg), "weights_id": weights_id,
        "kv_form": "pre-RoPE W_dec k|v rows (spec R1/R2)",
        "update_step": st.update_step, "initialized": bool(st.initialized),
        "ltm_age_dtype": list(st.ltm_age_dtype), "short_chunk_warned": bool(st.short_chunk_warned),
        "version": st.version, "num_ltm_layers": len(st.ltm),
        "rng_state": base64.b64encode(st.generator.get_state().numpy().tobytes()).decode("ascii"),
    }
    path = Path(path)
    atomic_replace_from(lambda tmp: save_file(t, tmp, metadata={META_KEY: json.dumps(meta)}), path)
    return path


def load(path, cfg: MPlusConfig, weights_id: str | None = None, max_ltm_rows: int | None = None) -> HostMemory:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such memory snapshot")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise SnapshotError(f"{path}: not a readable safetensors memory snapshot ({e})") from None
    if raw is None:
        raise SnapshotError(f"{path}: safetensors file without '{META_KEY}' metadata: not a memory snapshot "
                            "written by Engine.save_memory")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {meta.get('format')!r} v{meta.get('format_version')} is not "
                            f"supported (this runtime reads {FORMAT!r} v{FORMAT_VERSION})")
    want, got = _cfg_dict(cfg), meta.get("config") or {}
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        shown = ", ".join(f"{k}: snapshot {got.get(k)!r} vs model {want.get(k)!r}" for k in diff[:6])
        raise SnapshotError(f"{path}: this memory snapshot belongs to another model config ({shown}"
                            f"{' …' if len(diff) > 6 else ''}); load it into an engine for that model")
    if weights_id and meta.get("weights_id") and weights_id != meta["weights_id"]:
        raise SnapshotError(f"{path}: the snapshot's memory K/V were projected with other weights "
                            f"({meta['weights_id'][:12]}… vs {weights_id[:12]}…); load it into the artifact it came from")
    try:
        mem = _build(tensors, meta, cfg)
        mem.max_ltm_rows = max_ltm_rows
        return mem
    except KeyError as e:
        raise SnapshotError(f"{path}: snapshot is missing tensor {e}") from None


def _build(t: dict, meta: dict, cfg: MPlusConfig) -> HostMemory:
    L = cfg.num_hidden_layers
    if tuple(t["stm"].shape) != (L, cfg.N, cfg.hidden_size):
        raise SnapshotError(f"snapshot STM has shape {tuple(t['stm'].shape)}, the model needs {(L, cfg.N, cfg.hidden_size)}")
    g = torch.Generator(device="cpu")
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(meta["rng_state"])), dtype=torch.uint8))
    st = MemoryState(cfg=cfg, stm=t["stm"], stm_ages=t["stm_ages"], generator=g)
    n = int(meta.get("num_ltm_layers", 0))
    st.ltm = [t[f"ltm_kv.{l}"] for l in range(n)]
    st.ltm_keys = [t[f"ltm_keys.{l}"] for l in range(n)]
    st.ltm_ages = [t[f"ltm_ages.{l}"] for l in range(n)]
    st.ltm_rf = [t[f"ltm_rf.{l}"] for l in range(n)]
    st.ltm_age_dtype = list(meta.get("ltm_age_dtype") or [])
    if "pend_kv" in t:
        st.pend_vals, st.pend_keys, st.pend_ages = t["pend_kv"], t["pend_keys"], t["pend_ages"]
    st.update_step = int(meta["update_step"])
    st.initialized = bool(meta["initialized"])
    st.short_chunk_warned = bool(meta.get("short_chunk_warned", False))
    st.version = int(meta.get("version", 0))
    return HostMemory(cfg, st, t["stm_k"], t["stm_v"], t.get("stm_keys"), t["stm_written"])
