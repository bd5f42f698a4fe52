"""``manifest.json`` (artifact format v2, docs/graphs.md) and the memory-state files.

``load_manifest(OUT, verify=True)`` checks the format version and the sha256 of every listed file and
raises :class:`ArtifactError` naming the files that do not match (platform-notes §7: refuse mismatched
artefacts with a named error).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mplus_deploy.model.memory import MemoryState
from mplus_deploy.util.io import atomic_write_text, sha256_file

FORMAT_VERSION = 3
# What changed in each format version; an artifact of an older version is refused with this reason.
FORMAT_CHANGES = {
    1: "its decode graph takes the whole KV cache stacked (past_k/past_v [L, Hkv, C, Dh]); format 2 feeds the "
       "memory prefix and the tail per layer (prefix_k.{l}, prefix_v.{l}, past_k.{l}, past_v.{l}) so that a decode "
       "step no longer copies the cache",
    2: "its prefill graph takes the LTM stacked (ltm_keys/ltm_k/ltm_v [L, ...]) and returns logits for every prompt "
       "row; format 3 takes the LTM per layer (ltm_keys.{l}, ltm_k.{l}, ltm_v.{l}) and a logit_rows input, so that a "
       "query at paper scale copies no layer of the LTM and returns one row of logits",
}
MANIFEST = "manifest.json"
MEMORY_DIR = "memory"


class ArtifactError(RuntimeError):
    """An export artifact that cannot be used as is; ``.files`` lists the offending files."""

    def __init__(self, msg: str, files: list[str] | None = None):
        super().__init__(msg)
        self.files = list(files or [])


def hash_files(out: Path) -> dict[str, str]:
    out = Path(out)
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def versions() -> dict:
    import onnx
    import onnxruntime

    import mplus_deploy

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "exporter": f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}",
            "mplus_deploy": getattr(mplus_deploy, "__version__", "0.1.0")}


def write_manifest(out: Path, cfg, graphs: dict, precision: str, opset: int, memory: dict, tokenizer_files: list[str],
                   extra: dict | None = None) -> dict:
    """Hash every file under ``out`` and write ``out/manifest.json`` (atomically). Returns the manifest."""
    out = Path(out)
    m = {
        "format_version": FORMAT_VERSION,
        "model_kind": cfg.kind,
        "config": cfg.to_dict(),
        "precision": precision,
        "opset": opset,
        "versions": versions(),
        "graphs": graphs,
        "weights_file": "graphs/weights.data",
        "memory": memory,
        "tokenizer": {"dir": "tokenizer" if tokenizer_files else None, "files": tokenizer_files},
        **(extra or {}),
        "files": hash_files(out),
    }
    atomic_write_text(out / MANIFEST, json.dumps(m, indent=2, sort_keys=False) + "\n")
    os.chmod(out / MANIFEST, 0o644)
    return m


def load_manifest(out: Path, verify: bool = True) -> dict:
    out = Path(out)
    path = out / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} does not exist; is {out} an mplus-export output directory?", [MANIFEST])
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})", [MANIFEST]) from None
    fv = m.get("format_version")
    if fv != FORMAT_VERSION:
        why = f" ({FORMAT_CHANGES[fv]})" if fv in FORMAT_CHANGES else ""
        src = m.get("source") if isinstance(m.get("source"), dict) else {}
        src = src.get("preset") or src.get("checkpoint") or "SOURCE"
        raise ArtifactError(f"{path}: format_version {fv!r} is not supported (this mplus-deploy reads {FORMAT_VERSION})"
                            f"{why}; re-export it with this version: `mplus-export {src} -o {out} --overwrite`",
                            [MANIFEST])
    if verify:
        bad = []
        for rel, digest in m.get("files", {}).items():
            p = out / rel
            if not p.is_file():
                bad.append(f"{rel} (missing)")
            elif sha256_file(p) != digest:
                bad.append(f"{rel} (sha256 mismatch)")
        if bad:
            raise ArtifactError(f"artifact {out} does not match its manifest: " + ", ".join(bad)
                                + "; the files were modified or truncated, re-export", [b.split(" ")[0] for b in bad])
    return m


# ------------------------------------------------------------------------------------ memory state
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
