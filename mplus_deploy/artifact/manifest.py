"""``manifest.json`` (artifact format v4, docs/graphs.md): the one writer and reader.

``load_manifest(OUT, verify=True)`` checks the format version and the sha256 of every listed file and
raises :class:`ArtifactError` naming the files that do not match (platform-notes §7: refuse mismatched
artefacts with a named error). ``write_manifest`` (the exporter) and ``update_quantized`` (quantization
adds ``quantized.<mode>``) are the only writers. The graph entries are a dict ``{name: entry}`` as the
exporter writes them; ``graph_path`` / ``graph_info`` read them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.util.io import atomic_write_text, sha256_file

from .errors import ArtifactError

FORMAT_VERSION = 4
# What changed in each format version; an artifact of an older version is refused with this reason.
FORMAT_CHANGES = {
    1: "its decode graph takes the whole KV cache stacked (past_k/past_v [L, Hkv, C, Dh]); format 2 feeds the "
       "memory prefix and the tail per layer (prefix_k.{l}, prefix_v.{l}, past_k.{l}, past_v.{l}) so that a decode "
       "step no longer copies the cache",
    2: "its prefill graph takes the LTM stacked (ltm_keys/ltm_k/ltm_v [L, ...]) and returns logits for every prompt "
       "row; format 3 takes the LTM per layer (ltm_keys.{l}, ltm_k.{l}, ltm_v.{l}) and a logit_rows input, so that a "
       "query at paper scale copies no layer of the LTM and returns one row of logits",
    3: "it has no decode_batch graph; format 4 adds it (one decode step for many sequences, each over its own "
       "memory prefix: batched generation across sessions and continuous batching in mplus-serve)",
}
MANIFEST = "manifest.json"


def hash_files(out: Path) -> dict[str, str]:
    """sha256 of every file of the artifact but the manifest and scratch paths (any part starting with ".")."""
    out = Path(out)
    return {rel: sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and (rel := p.relative_to(out).as_posix()) != MANIFEST
            and not any(part.startswith(".") for part in rel.split("/"))}


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
    _write(out, m)
    return m


def update_quantized(out: Path, mode: str, section: dict) -> dict:
    """Add/replace ``manifest["quantized"][mode]`` and re-hash every file (the quantized graphs are new)."""
    out = Path(out)
    m = load_manifest(out, verify=False)
    m.setdefault("quantized", {})[mode] = section
    m["files"] = hash_files(out)
    _write(out, m)
    return m


def _write(out: Path, m: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(m, indent=2, sort_keys=False) + "\n")
    os.chmod(out / MANIFEST, 0o644)


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


def config_from_manifest(manifest: dict, root: Path) -> MPlusConfig:
    if not isinstance(manifest.get("config"), dict):
        raise ArtifactError(f"{Path(root) / MANIFEST}: has no model 'config'; re-export with a current mplus-export",
                            [MANIFEST])
    return MPlusConfig.from_dict(manifest["config"])


def graph_info(manifest: dict, name: str) -> dict:
    """The manifest entry of graph ``name`` (``{}`` when the artifact has no such graph)."""
    return (manifest.get("graphs") or {}).get(name) or {}


def graph_path(root: Path, manifest: dict, name: str) -> Path | None:
    info = graph_info(manifest, name)
    return Path(root) / info["file"] if info else None


def record_validation(out: Path, results: dict) -> dict:
    """Put each graph's validation result (``{graph: {...}}``) into its manifest entry. Only manifest.json
    changes (it is not among the hashed files), so nothing is re-hashed."""
    out = Path(out)
    m = load_manifest(out, verify=False)
    for g, v in results.items():
        m["graphs"][g]["validation"] = v
    _write(out, m)
    return m
