"""What the engine loads: an exported artifact directory (``manifest.json``, docs/graphs.md), or, for
the torch backend, an official-layout checkpoint directory, a preset name or an ``MPlus`` instance.

Loaders are lazy (style.md): ``open_source`` only reads the manifest / config; weights, graphs and
the initial memory are read when a backend or the memory manager asks for them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mplus_deploy.model import MPlus, MemoryState
from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.util.io import sha256_file

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact / checkpoint that cannot be served; the message names the file and what to fix."""


@dataclass
class Source:
    kind: str  # "artifact" | "checkpoint" | "preset" | "model"
    cfg: MPlusConfig
    root: Path | None = None
    manifest: dict | None = None
    model: MPlus | None = None  # torch weights, once loaded
    name: str = ""
    extra: dict = field(default_factory=dict)
    quantized: str | None = None  # the quantized graphs' mode the runner serves (set by ``make_runner``)

    # ------------------------------------------------------------------ facts
    @property
    def has_graphs(self) -> bool:
        return bool(self.manifest and self.manifest.get("graphs"))

    @property
    def tokenizer_dir(self) -> Path | None:
        if self.root is None:
            return None
        for d in (self.root / "tokenizer", self.root):
            if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
                return d
        return None

    @property
    def max_ltm_rows(self) -> int | None:
        """S_max of the exported prefill graph (its TensorRT profile bound), if the manifest records it."""
        lim = (self.manifest or {}).get("limits") or {}
        return int(lim["max_ltm"]) if lim.get("max_ltm") else None

    @property
    def weights_id(self) -> str | None:
        """Identity of the weights the memory K/V were projected with (kept in memory snapshots, checked
        on load): ``weights_id_for(self.quantized)``, the mode the engine's runner serves."""
        return self.weights_id_for(self.quantized)

    def weights_id_for(self, quantized: str | None) -> str | None:
        """fp32 graphs: the sha256 of ``graphs/weights.data`` (as before, so fp32 snapshots stay valid).
        Quantized graphs of ``quantized`` (``manifest["quantized"][mode]``): ``"<mode>:"`` + a sha256 over
        that id, the mode and the manifest hashes of the mode's graph files and ``weights.<mode>.data``;
        so a snapshot cannot move silently between fp32 and quantized engines, or between modes or
        re-quantizations. ``None`` without a manifest (torch presets / checkpoints: nothing to check)."""
        if not self.manifest:
            return None
        files = self.manifest.get("files") or self.manifest.get("sha256") or {}
        if not isinstance(files, dict):
            return None

        def digest(rel):
            v = files.get(rel)
            return v if isinstance(v, str) else (v.get("sha256") if isinstance(v, dict) else None)

        base = digest(self.manifest.get("weights_file") or "graphs/weights.data")
        if base is None:
            base = next((digest(k) for k in files if k.endswith("weights.data")), None)
        if not quantized:
            return base
        sec = (self.manifest.get("quantized") or {}).get(quantized)
        sec = sec if isinstance(sec, dict) else {}
        graphs = sec.get("graphs") if isinstance(sec.get("graphs"), dict) else {}
        rels = sorted({e["file"] for e in graphs.values() if isinstance(e, dict) and isinstance(e.get("file"), str)}
                      | ({sec["data_file"]} if isinstance(sec.get("data_file"), str) else set()))
        blob = json.dumps({"fp32": base, "mode": quantized, "files": {r: digest(r) for r in rels}}, sort_keys=True)
        return f"{quantized}:{hashlib.sha256(blob.encode()).hexdigest()}"

    # ------------------------------------------------------------------ lazy parts
    def torch_model(self, dtype: torch.dtype = torch.float32) -> MPlus:
        if self.model is not None:
            return self.model
        target = None
        if self.kind in ("checkpoint", "preset"):
            target = str(self.root) if self.root is not None else self.name
        elif self.kind == "artifact":
            src = (self.manifest or {}).get("source") or {}
            src = src if isinstance(src, dict) else {"path": src}
            cand = src.get("checkpoint") or src.get("path") or src.get("preset")
            if cand and (Path(cand).is_dir() or os.sep not in str(cand)):
                target = str(cand)
            if target is None:
                raise ArtifactError(
                    f"{self.root}: backend='torch' needs the model weights as a checkpoint directory or preset, "
                    "and this artifact's manifest names no usable source; pass the checkpoint directory instead, "
                    "or use backend='onnxruntime'")
        self.model = _load_model(target, dtype)
        return self.model

    def initial_memory(self) -> MemoryState:
        """The artifact's / checkpoint's memory state as hidden rows (converted to K/V form by the caller)."""
        if self.kind == "artifact":
            try:
                from mplus_deploy.export.manifest import load_memory_state
            except ImportError:
                return _read_initial_memory(self.root, self.cfg)
            return load_memory_state(self.root, self.cfg)
        return self.torch_model().memory.clone()


def _load_model(target: str, dtype: torch.dtype) -> MPlus:
    try:
        from mplus_deploy.model.checkpoint import load
    except ImportError:  # pragma: no cover - older tree
        from mplus_deploy.model.config import preset

        return MPlus.from_config(preset(target)).to(dtype=dtype)
    return load(target, dtype=dtype)


def open_source(path) -> Source:
    """``path``: artifact dir, checkpoint dir, preset name, or an ``MPlus`` instance."""
    if isinstance(path, MPlus):
        return Source("model", path.config, model=path, name="<MPlus>")
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).exists():
        manifest = load_manifest(p)
        return Source("artifact", config_from_manifest(manifest, p), root=p, manifest=manifest, name=str(p))
    if p.is_dir() and (p / "config.json").exists():
        return Source("checkpoint", MPlusConfig.from_json(p), root=p, name=str(p))
    if p.is_dir():
        raise ArtifactError(f"{p}: neither an exported artifact (no {MANIFEST}) nor a checkpoint (no config.json); "
                            "run `mplus-export` first")
    from mplus_deploy.model.config import PRESETS

    names = set(PRESETS) | {"demo"}
    if str(path) in names:
        if str(path) == "demo":  # SmolLM2-135M backbone + its tokenizer (mplus_deploy.model.presets)
            from mplus_deploy.model.presets import demo_model

            model, tok = demo_model()
            return Source("preset", model.config, model=model, name="demo", extra={"tokenizer": tok})
        from mplus_deploy.model.config import preset

        return Source("preset", preset(str(path)), name=str(path))
    raise ArtifactError(f"{path!r} does not exist and is not a preset ({sorted(names)}); pass an exported "
                        "artifact directory (with manifest.json), a checkpoint directory or a preset name")


# ---------------------------------------------------------------------------------- manifest
def load_manifest(root: Path) -> dict:
    """The exporter's ``load_manifest`` (hash-verified) when present, else our own sha256 check."""
    try:
        from mplus_deploy.export.manifest import load_manifest as exporter_load
    except ImportError:
        exporter_load = None
    if exporter_load is not None:
        m = exporter_load(root)
        return m if isinstance(m, dict) else getattr(m, "data", None) or getattr(m, "__dict__", {})
    try:
        m = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{root / MANIFEST}: not valid JSON ({e.msg} at line {e.lineno})") from None
    verify_hashes(root, m)
    return m


def verify_hashes(root: Path, manifest: dict) -> None:
    files = manifest.get("files") or manifest.get("sha256") or {}
    items = files.items() if isinstance(files, dict) else ((f["path"], f) for f in files)
    for rel, info in items:
        want = info if isinstance(info, str) else info.get("sha256")
        if not want:
            continue
        f = root / rel
        if not f.exists():
            raise ArtifactError(f"{f}: listed in {MANIFEST} but missing; re-export or copy the whole directory")
        got = sha256_file(f)
        if got != want:
            raise ArtifactError(f"{f}: sha256 {got[:12]}… does not match {MANIFEST} ({want[:12]}…); the file is "
                                "corrupt or was changed after export; re-export")


def config_from_manifest(manifest: dict, root: Path) -> MPlusConfig:
    d = manifest.get("config") or (manifest.get("model") or {}).get("config")
    if d is None and (root / "config.json").exists():
        return MPlusConfig.from_json(root)
    if d is None:
        raise ArtifactError(f"{root / MANIFEST}: has no model 'config'; re-export with a current mplus-export")
    return MPlusConfig.from_dict(d)


def graph_path(root: Path, manifest: dict, name: str) -> Path | None:
    g = (manifest.get("graphs") or {})
    if isinstance(g, list):
        g = {x["name"]: x for x in g}
    info = g.get(name)
    if info is None:
        return None
    f = info.get("file") or info.get("path") if isinstance(info, dict) else info
    return root / f


def graph_info(manifest: dict, name: str) -> dict:
    g = manifest.get("graphs") or {}
    if isinstance(g, list):
        g = {x["name"]: x for x in g}
    return g.get(name) or {}


# ---------------------------------------------------------------------------------- initial memory
def _read_initial_memory(root: Path, cfg: MPlusConfig) -> MemoryState:
    from safetensors.torch import load_file

    f = root / "memory" / "initial.safetensors"
    if not f.exists():
        raise ArtifactError(f"{f}: missing; the artifact has no initial memory (re-export)")
    t = load_file(str(f))
    meta_f = root / "memory" / "initial.json"
    meta = json.loads(meta_f.read_text()) if meta_f.exists() else {}
    L = cfg.num_hidden_layers
    mem = MemoryState(cfg=cfg, stm=t["stm"].float(),
                      stm_ages=t.get("stm_ages", torch.zeros(L, cfg.N)).to(torch.float64))
    if cfg.is_mplus:
        mem.ltm = [t[f"ltm.{l}"].float() for l in range(L)]
        mem.ltm_keys = [t[f"ltm_keys.{l}"].float() for l in range(L)]
        mem.ltm_ages = [t[f"ltm_ages.{l}"].to(torch.float64) for l in range(L)]
        mem.ltm_rf = [t[f"ltm_rf.{l}"].to(torch.float64) for l in range(L)]
        mem.ltm_age_dtype = list(meta.get("ltm_age_dtype") or ["int32"] * L)
        for a, b, c in (("pend_vals", "pend_keys", "pend_ages"), ("pending", "pending_keys", "pending_ages")):
            if a in t:
                mem.pend_vals, mem.pend_keys, mem.pend_ages = t[a].float(), t[b].float(), t[c].to(torch.float64)
    mem.update_step = int(meta.get("update_step", 0))
    mem.initialized = bool(meta.get("initialized", True))
    return mem
