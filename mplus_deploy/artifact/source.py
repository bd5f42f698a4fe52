"""What an engine opens: an exported artifact directory (``manifest.json``, docs/graphs.md), or, for the torch
backend, an official-layout checkpoint directory, a preset name (``model.presets``, ``demo`` included) or an
``MPlus`` instance.

Loaders are lazy (style.md): ``open_source`` only reads the manifest / config; weights, graphs and the
initial memory are read when a backend or the memory manager asks for them.
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

from .errors import ArtifactError
from .manifest import MANIFEST, config_from_manifest, load_manifest
from .memory_files import load_memory_state


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
        """S_max of the exported prefill graph (its TensorRT profile bound); ``None`` without an artifact."""
        v = self.manifest["limits"].get("max_ltm") if self.manifest else None
        return int(v) if v else None  # MemoryLLM artifacts have no LTM bound

    @property
    def max_prompt(self) -> int | None:
        """The longest prompt the exported graphs were built for (``mplus-export --max-prompt``); ``None``
        without an artifact."""
        v = self.manifest["limits"].get("max_prompt") if self.manifest else None
        return int(v) if v else None

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
        files = self.manifest["files"]
        base = files.get(self.manifest["weights_file"])
        if not quantized:
            return base
        sec = self.manifest["quantized"][quantized]
        rels = sorted({e["file"] for e in sec["graphs"].values() if "file" in e}
                      | ({sec["data_file"]} if sec.get("data_file") else set()))
        blob = json.dumps({"fp32": base, "mode": quantized, "files": {r: files.get(r) for r in rels}}, sort_keys=True)
        return f"{quantized}:{hashlib.sha256(blob.encode()).hexdigest()}"

    # ------------------------------------------------------------------ lazy parts
    def torch_model(self, dtype: torch.dtype = torch.float32) -> MPlus:
        from mplus_deploy.model.checkpoint import load

        if self.model is not None:
            return self.model
        target = None
        if self.kind in ("checkpoint", "preset"):
            target = str(self.root) if self.root is not None else self.name
        elif self.kind == "artifact":
            src = self.manifest.get("source") or {}
            cand = src.get("checkpoint") or src.get("preset")
            if cand and (Path(cand).is_dir() or os.sep not in str(cand)):
                target = str(cand)
            if target is None:
                raise ArtifactError(
                    f"{self.root}: backend='torch' needs the model weights as a checkpoint directory or preset, "
                    "and this artifact's manifest names no usable source; pass the checkpoint directory instead, "
                    "or use backend='onnxruntime'")
        self.model = load(target, dtype=dtype)
        return self.model

    def initial_memory(self) -> MemoryState:
        """The artifact's / checkpoint's memory state as hidden rows (converted to K/V form by the caller)."""
        if self.kind == "artifact":
            return load_memory_state(self.root, self.cfg)
        return self.torch_model().memory.clone()


def open_source(path) -> Source:
    """``path``: artifact dir, checkpoint dir, preset name, or an ``MPlus`` instance."""
    from mplus_deploy.model.presets import names as preset_names

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
    if str(path) in preset_names():
        from mplus_deploy.model.presets import demo_model, is_demo

        if is_demo(path):  # SmolLM2-135M backbone + its tokenizer (mplus_deploy.model.presets)
            model, tok = demo_model(variant=str(path))
            return Source("preset", model.config, model=model, name=str(path), extra={"tokenizer": tok})
        from mplus_deploy.model.config import preset

        return Source("preset", preset(str(path)), name=str(path))
    raise ArtifactError(f"{path!r} does not exist and is not a preset ({sorted(preset_names())}); pass an exported "
                        "artifact directory (with manifest.json), a checkpoint directory or a preset name")
