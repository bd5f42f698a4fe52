"""Official-layout M+ / MemoryLLM checkpoints: ``load`` and ``save`` (spec §10).

Layout (a HF-style directory, spec §10.1/§10.3):

- ``config.json`` (:class:`MPlusConfig`, official field names),
- ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  (``{"metadata": {"total_size": ...}, "weight_map": {key: file}}``),
- keys: the backbone / LoRA / retriever keys exactly as :meth:`MPlus.state_dict` names them,
  ``memory`` (STM [L, N, d]), ``bos_embedding``, ``new_memory_positional_emb``; M+: ``ltm.{i}``,
  ``ltm_keys.{i}``, ``ltm_ages.{i}``, ``ltm_recall_frequencies.{i}``; MemoryLLM: ``initialized``
  (uint8 scalar). ``lm_head.weight`` is absent when ``tie_word_embeddings`` (accepted and ignored if
  present).

Loading is lazy and low-memory: the model is built on the ``meta`` device, every safetensors file is
opened with :func:`safetensors.safe_open` (which validates the header and that the file is fully
covered, so truncated / foreign files are caught and named), and each tensor is then read with
``readinto`` straight into its final target-dtype buffer (dtype conversion in 64 MB pieces). Peak RSS
is therefore about one target-dtype model plus 64 MB, never 2x the checkpoint (``bench/load_rss.py``).
Nothing here touches the network.

What an official checkpoint does not hold (spec §2) is not saved either: STM ages (they restart at 0
on load, as in the official code), the pending LTM cache, ``update_step`` and the RNG state. ``save``
warns when it drops a non-empty pending cache. Use the memory-snapshot API for per-user state.

Toolkit additions, ignored by the official loader: LTM ages / recall frequencies are stored as F64 so
a save/load round trip is exact (the official code turns them into numpy int32 / float32, then float64
after the first merge); the per-layer ``ltm_age_dtype`` ("int32" before the first merge, "float64"
after, spec §11.3) rides in the safetensors metadata (default "int32", as ``put_ltm_to_numpy`` makes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .config import ConfigError, MPlusConfig, preset
from .mplus import MPlus
from .safetensors_io import CheckpointError, TensorFile, nbytes, parse_size, split_shards, write_safetensors  # noqa: F401 (re-exported)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

MEM_RE = re.compile(r"^(ltm|ltm_keys|ltm_ages|ltm_recall_frequencies)\.(\d+)$")
_LTM_FIELDS = ("ltm", "ltm_keys", "ltm_ages", "ltm_recall_frequencies")



# =============================================================================== small helpers

def weight_files(path: Path) -> dict[str, TensorFile]:
    """key → TensorFile for a checkpoint directory (single file or index + shards), validated."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.exists():
        f = TensorFile(single)
        return {k: f for k in f.entries}
    if not index.exists():
        present = sorted(p.name for p in path.iterdir())[:20]
        hint = " (PyTorch .bin weights are not supported: convert them to safetensors)" if any(
            n.endswith(".bin") for n in present) else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} and no {INDEX_NAME}; found {present}{hint}")
    try:
        idx = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: invalid JSON ({e.msg} at line {e.lineno} col {e.colno}); re-save the checkpoint") from None
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: no 'weight_map' object (expected {{\"metadata\": ..., \"weight_map\": {{key: file}}}})")
    files: dict[str, TensorFile] = {}
    missing = sorted({fn for fn in wm.values() if not (path / fn).exists()})
    if missing:
        raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {missing}; re-download them")
    out: dict[str, TensorFile] = {}
    for fn in dict.fromkeys(wm.values()):
        files[fn] = TensorFile(path / fn)
    for k, fn in wm.items():
        if k not in files[fn].entries:
            raise CheckpointError(f"{index}: maps {k!r} to {fn}, but that shard has no such tensor; the index and shards disagree")
        out[k] = files[fn]
    for fn, f in files.items():  # tensors present in a shard but not listed: still usable, index wins
        for k in f.entries:
            out.setdefault(k, f)
    return out


# =============================================================================== load
def build_meta(cfg: MPlusConfig) -> MPlus:
    with torch.device("meta"):
        return MPlus(cfg)


def validate_files(cfg: MPlusConfig, model: MPlus, files: dict[str, TensorFile], path: Path) -> tuple[list, dict]:
    """→ (param names to read, ltm row counts per layer); raises CheckpointError listing every problem."""
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head deduplicated
    present = {k: f.entries[k][1] for k, f in files.items()}
    errs: list[str] = []
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    mem_expected = {"memory"} | ({f"{n}.{i}" for n in _LTM_FIELDS for i in range(L)} if cfg.is_mplus else {"initialized"})
    missing = sorted(set(expected) - set(present)) + sorted(mem_expected - set(present))
    unexpected = sorted(k for k in present if k not in expected and k not in mem_expected and k not in ignored
                        and not (cfg.is_mplus and MEM_RE.match(k)))
    if missing:
        errs.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        errs.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    for k, shp in expected.items():
        if k in present and present[k] != shp:
            errs.append(f"shape mismatch for {k}: expected {list(shp)} (from config.json), got {list(present[k])}")
    for k, f in files.items():
        if k in expected and not f.entries[k][0].is_floating_point:
            errs.append(f"{k}: stored dtype {f.entries[k][0]} is not floating point")

    # ---- memory consistency (spec §1.2, §10.3)
    if "memory" in present:
        shp = present["memory"]
        if len(shp) != 3 or shp[0] != L or shp[2] != d:
            errs.append(f"inconsistent memory fields: `memory` has shape {list(shp)}, expected "
                        f"[num_hidden_layers={L}, N, hidden_size={d}]")
        elif shp[1] != cfg.N:
            how = (f"(num_blocks={cfg.num_blocks} - num_ltm_blocks={cfg.num_ltm_blocks}) x num_tokens={cfg.num_tokens}"
                   if cfg.is_mplus else f"num_blocks={cfg.num_blocks} x num_tokens={cfg.num_tokens}")
            errs.append(f"inconsistent memory fields: `memory` holds N={shp[1]} STM slots per layer but config.json gives "
                        f"{how} = {cfg.N}; fix num_blocks / num_ltm_blocks / num_tokens in config.json")
    rows: dict[int, int] = {}
    if cfg.is_mplus:
        extra = sorted({int(m.group(2)) for k in present if (m := MEM_RE.match(k)) and int(m.group(2)) >= L})
        if extra:
            errs.append(f"inconsistent memory fields: the checkpoint has LTM entries for layer(s) {_short(extra)} but "
                        f"config.json has num_hidden_layers={L} (ltm.{{i}} must exist for i in 0..{L - 1})")
        dr = cfg.selector_hidden_dim
        for i in range(L):
            shp = {n: present.get(f"{n}.{i}") for n in _LTM_FIELDS}
            if any(s is None for s in shp.values()):
                continue
            v, k_, a, r = shp["ltm"], shp["ltm_keys"], shp["ltm_ages"], shp["ltm_recall_frequencies"]
            if len(v) != 2 or v[1] != d:
                errs.append(f"inconsistent memory fields: ltm.{i} has shape {list(v)}, expected [S, hidden_size={d}]")
                continue
            if len(k_) != 2 or k_[1] != dr:
                errs.append(f"inconsistent memory fields: ltm_keys.{i} has shape {list(k_)}, expected [S, selector_hidden_dim={dr}] "
                            "(check selector_hidden_dim in config.json)")
                continue
            if k_[0] != v[0] or tuple(a) != (v[0],) or tuple(r) != (v[0],):
                errs.append(f"inconsistent memory fields: layer {i} LTM row counts differ: ltm {v[0]}, ltm_keys {k_[0]}, "
                            f"ltm_ages {list(a)}, ltm_recall_frequencies {list(r)}")
                continue
            rows[i] = v[0]
    elif "initialized" in present and present["initialized"] not in ((), (1,)):
        errs.append(f"inconsistent memory fields: `initialized` must be a scalar, got shape {list(present['initialized'])}")
    if errs:
        raise CheckpointError(f"cannot load checkpoint {path}:\n  - " + "\n  - ".join(errs))
    if cfg.is_mplus and rows and len(set(rows.values())) == 1 and next(iter(rows.values())) != cfg.ltm_initial_size:
        warnings.warn(f"{path}: LTM has {next(iter(rows.values()))} rows per layer but config ltm_initial_size="
                      f"{cfg.ltm_initial_size}; using the checkpoint's rows", stacklevel=3)
    return list(expected), rows


def _short(xs: list, n: int = 12) -> str:
    xs = [str(x) for x in xs]
    return ", ".join(xs[:n]) + (f", ... (+{len(xs) - n} more)" if len(xs) > n else "")


def load(path_or_preset: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         seed: int = 0) -> MPlus:
    """Load an official-layout checkpoint directory, or build a preset (``tiny``, ``tiny-memoryllm``,
    ``small``, ``demo``, ...). Float tensors are converted to ``dtype`` one by one; ages and recall
    frequencies are float64. Raises :class:`CheckpointError` with an actionable message."""
    p = Path(path_or_preset)
    if not p.is_dir():
        name = str(path_or_preset)
        from .presets import demo_model, is_demo

        if is_demo(name):
            model, _ = demo_model(variant=name)
        elif p.exists() and p.name == CONFIG_NAME:
            return load(p.parent, dtype, device)
        else:
            try:
                cfg = preset(name)
            except ConfigError:
                raise CheckpointError(f"{name!r} is neither a checkpoint directory nor a preset; presets: "
                                      f"{sorted(_preset_names())}") from None
            model = MPlus.from_config(cfg, seed=seed)
        return model.to(device=device, dtype=dtype)

    try:
        cfg = MPlusConfig.from_json(p)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(p)
    model = build_meta(cfg)
    names, rows = validate_files(cfg, model, files, p)

    def read(k, dt):
        return files[k].read(k, dt)

    for n in names:
        mod_name, _, leaf = n.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        mod._parameters[leaf] = nn.Parameter(read(n, dtype), requires_grad=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight

    _read_memory(files, cfg, dtype, model.memory)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # cannot happen after validate_files; belt and braces
            raise CheckpointError(f"{p}: {n} was not loaded")
    model.checkpoint_path = str(p)
    if torch.device(device).type != "cpu":
        model.to(device)
    return model


def _read_memory(files: dict, cfg: MPlusConfig, dtype: torch.dtype, mem) -> None:
    """The checkpoint's memory (STM, LTM values / keys / ages / rf, or MemoryLLM ``initialized``) into ``mem``."""
    def read(k, dt):
        return files[k].read(k, dt)

    L = cfg.num_hidden_layers
    mem.stm = read("memory", dtype)
    mem.stm_ages = torch.zeros(L, cfg.N, dtype=torch.float64)  # not in checkpoints: restart at 0 (spec §8)
    mem.pend_vals = mem.pend_keys = mem.pend_ages = None
    mem.update_step = 0
    if cfg.is_mplus:
        meta = next(iter(files.values())).metadata if files else {}
        mem.ltm = [read(f"ltm.{i}", dtype) for i in range(L)]
        mem.ltm_keys = [read(f"ltm_keys.{i}", dtype) for i in range(L)]
        mem.ltm_ages = [read(f"ltm_ages.{i}", torch.float64) for i in range(L)]
        mem.ltm_rf = [read(f"ltm_recall_frequencies.{i}", torch.float64) for i in range(L)]
        mem.ltm_age_dtype = _age_dtypes(meta, L)
        mem.initialized = True
    else:
        mem.initialized = bool(read("initialized", None).reshape(-1)[0].item())
    mem.touch()


def load_memory(path: str | os.PathLike, cfg: MPlusConfig | None = None, dtype: torch.dtype = torch.float32):
    """Only the memory state of a checkpoint directory (no weights read): what an exporter ships as the
    artifact's initial memory without holding the model."""
    from .memory import MemoryState

    p = Path(path)
    cfg = cfg or MPlusConfig.from_json(p)
    files = weight_files(p)
    mem = MemoryState(cfg=cfg, stm=torch.zeros(0), stm_ages=torch.zeros(0, dtype=torch.float64))
    _read_memory(files, cfg, dtype, mem)
    return mem


def _age_dtypes(meta: dict, L: int) -> list[str]:
    raw = meta.get("mplus_deploy.ltm_age_dtype")
    if raw:
        try:
            v = json.loads(raw)
            if isinstance(v, list) and len(v) == L and all(x in ("int32", "float64") for x in v):
                return v
        except json.JSONDecodeError:
            pass
    return ["int32"] * L  # put_ltm_to_numpy makes ages int32 (spec §2)


def _preset_names():
    from .presets import names

    return names()


# =============================================================================== save
def checkpoint_tensors(model: MPlus, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple, torch.Tensor]]:
    """Official-layout (name, stored dtype, shape, tensor) list of ``model`` (params, then memory)."""
    cfg, mem = model.config, model.memory
    out = []

    def add(name, t, dt=None):
        dt = dt or (dtype or t.dtype)
        out.append((name, dt, tuple(t.shape), t))

    add("memory", mem.stm)
    for n, p in model.named_parameters():  # tied lm_head is deduplicated by named_parameters
        add(n, p)
    if cfg.is_mplus:
        L = cfg.num_hidden_layers
        for i in range(L):
            add(f"ltm.{i}", mem.ltm[i])
        for i in range(L):
            add(f"ltm_keys.{i}", mem.ltm_keys[i])
        for i in range(L):
            add(f"ltm_ages.{i}", mem.ltm_ages[i].to(torch.float64), torch.float64)
        for i in range(L):
            add(f"ltm_recall_frequencies.{i}", mem.ltm_rf[i].to(torch.float64), torch.float64)
    else:
        add("initialized", torch.tensor(int(bool(mem.initialized)), dtype=torch.uint8), torch.uint8)
    return out


def save(model: MPlus, path: str | os.PathLike, shard_size: int | str = "2GB", dtype: torch.dtype | None = None,
         tokenizer=None) -> Path:
    """Write ``model`` as an official-layout checkpoint directory; returns the path.

    Files are written one by one atomically (temp + rename), config.json last. Sharded (HF index format)
    when the weights exceed ``shard_size``. ``dtype`` (default: the model's) applies to float weights and
    memory values; ages / recall frequencies stay F64. The tokenizer (argument, or ``model.tokenizer``)
    is saved alongside. Runtime-only memory (pending cache, update_step, STM ages, RNG) is not saved."""
    from mplus_deploy.util.io import atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, mem = model.config, model.memory
    if mem.n_pending:
        warnings.warn(f"save: the pending LTM cache ({mem.n_pending} rows/layer) and update_step are runtime state and are "
                      "not part of an official checkpoint; they are dropped (use a memory snapshot to keep them)", stacklevel=2)
    entries = checkpoint_tensors(model, dtype)
    limit = parse_size(shard_size)
    shards = split_shards(entries, limit)
    meta = {"format": "pt"}
    if cfg.is_mplus:
        meta["mplus_deploy.ltm_age_dtype"] = json.dumps(list(mem.ltm_age_dtype))
    written = []
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fn, sh in zip(names, shards):
        write_safetensors(path / fn, sh, meta)
        written.append(fn)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(e[1], e[2]) for e in entries)},
                 "weight_map": {e[0]: fn for fn, sh in zip(names, shards) for e in sh}}
        atomic_write_text(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    # stale weight files from an earlier save into the same directory would shadow / confuse the new ones
    for old in path.iterdir():
        if old.name not in written and (re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name)
                                        or (old.name == INDEX_NAME and len(shards) == 1)):
            old.unlink()
    kw = {}
    if dtype is not None or model.dtype is not None:
        kw["torch_dtype"] = str(dtype or model.dtype).replace("torch.", "")
    if cfg.is_mplus:
        sizes = {t.shape[0] for t in mem.ltm}
        if len(sizes) == 1:
            kw["ltm_initial_size"] = int(sizes.pop())
    dataclasses.replace(cfg, **kw).to_json(path / CONFIG_NAME)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(path))
    return path


def read_checkpoint_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Raw stored tensors of a checkpoint directory (for tests / inspection); no dtype conversion."""
    files = weight_files(Path(path))
    return {k: files[k].read(k, None) for k in (keys if keys is not None else files)}
