"""The initial memory state shipped with an artifact: ``memory/initial.safetensors`` + ``memory/initial.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mplus_deploy.model.memory import MemoryState
from mplus_deploy.util.io import atomic_write_text

from .errors import ArtifactError

MEMORY_DIR = "memory"

def save_memory_state(out: Path, mem: MemoryState) -> dict:
    """``memory/initial.safetensors`` + ``memory/initial.json``; returns the memory section of the manifest."""
    from safetensors.torch import save_file

    d = Path(out) / MEMORY_DIR
    d.mkdir(parents=True, exist_ok=True)
    t = {"stm": mem.stm, "stm_ages": mem.stm_ages}
    for l in range(len(mem.ltm)):
        t[f"ltm.{l}"], t[f"ltm_keys.{l}"] = mem.ltm[l], mem.ltm_keys[l]
        t[f"ltm_ages.{l}"], t[f"ltm_rf.{l}"] = mem.ltm_ages[l], mem.ltm_rf[l]
    if mem.pend_vals is not None:
        t["pend_vals"], t["pend_keys"], t["pend_ages"] = mem.pend_vals, mem.pend_keys, mem.pend_ages
    save_file({k: v.detach().contiguous() for k, v in t.items()}, str(d / "initial.safetensors"))
    info = {"update_step": int(mem.update_step), "initialized": bool(mem.initialized),
            "ltm_age_dtype": list(mem.ltm_age_dtype), "n_pending": mem.n_pending,
            "dtypes": {"values": str(mem.stm.dtype).replace("torch.", ""), "ages": "float64", "rf": "float64"}}
    atomic_write_text(d / "initial.json", json.dumps(info, indent=2) + "\n")
    for f in ("initial.json", "initial.safetensors"):
        os.chmod(d / f, 0o644)
    return info


def load_memory_state(out: Path, cfg) -> MemoryState:
    """The memory state shipped with an artifact (``memory/initial.*``) as a ``MemoryState``."""
    from safetensors.torch import load_file

    d = Path(out) / MEMORY_DIR
    for f in ("initial.safetensors", "initial.json"):
        if not (d / f).is_file():
            raise ArtifactError(f"{d / f} is missing; the artifact has no initial memory state", [f"{MEMORY_DIR}/{f}"])
    t = load_file(str(d / "initial.safetensors"))
    info = json.loads((d / "initial.json").read_text())
    L = cfg.num_hidden_layers
    if t["stm"].shape != (L, cfg.N, cfg.hidden_size):
        raise ArtifactError(f"memory/initial.safetensors: stm shape {tuple(t['stm'].shape)} does not match the config "
                            f"[{L}, {cfg.N}, {cfg.hidden_size}]", [f"{MEMORY_DIR}/initial.safetensors"])
    mem = MemoryState(cfg=cfg, stm=t["stm"], stm_ages=t["stm_ages"])
    if cfg.is_mplus:
        mem.ltm = [t[f"ltm.{l}"] for l in range(L)]
        mem.ltm_keys = [t[f"ltm_keys.{l}"] for l in range(L)]
        mem.ltm_ages = [t[f"ltm_ages.{l}"] for l in range(L)]
        mem.ltm_rf = [t[f"ltm_rf.{l}"] for l in range(L)]
        mem.ltm_age_dtype = list(info.get("ltm_age_dtype") or ["int32"] * L)
        if "pend_vals" in t:
            mem.pend_vals, mem.pend_keys, mem.pend_ages = t["pend_vals"], t["pend_keys"], t["pend_ages"]
    mem.update_step = int(info.get("update_step", 0))
    mem.initialized = bool(info.get("initialized", True))
    mem.touch()
    return mem
