"""Where the exporter's weights come from, one tensor at a time (issue 13: export memory must not grow
with the model).

Graphs are traced on a **skeleton**: the real ``MPlus`` module tree whose parameters are zero-stride
views of one scalar (``torch.full((), c).expand(shape)``: a 128256 x 4096 embedding costs 4 bytes).
TorchScript traces it with the parameters as graph inputs (``export_params=False``), so no traced proto
ever holds a weight; ``bind.bind_weights`` then turns each such input into an external-data initializer
whose bytes a :class:`WeightSource` reads for it, and writes it once into ``graphs/weights.data``.

- :class:`ModelWeights`: an in-memory ``MPlus`` (presets, ``demo``, tests).
- :class:`CheckpointWeights`: an official-layout checkpoint directory, read tensor by tensor from its
  safetensors files (``model.safetensors_io``): peak RSS ~ the largest tensor.

Both also provide the reference model for validation and the initial memory state.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from mplus_deploy.model import MPlus
from mplus_deploy.model.checkpoint import build_meta, weight_files, load, load_memory

FAKE_VALUE = 0.02  # skeleton parameter value: finite, non-zero, so tracing never divides by zero


def skeleton(cfg, dtype: torch.dtype) -> tuple[MPlus, dict[int, str]]:
    """``MPlus(cfg)`` whose parameters are zero-stride views (no weight bytes), and ``{id(param): name}``
    (official checkpoint key) for binding. The memory state stays on the meta device (never traced)."""
    m = build_meta(cfg)
    names: dict[int, str] = {}
    for n, p in list(m.named_parameters()):
        mod_name, _, leaf = n.rpartition(".")
        mod = m.get_submodule(mod_name) if mod_name else m
        fake = nn.Parameter(torch.full((), FAKE_VALUE, dtype=dtype).expand(p.shape), requires_grad=False)
        mod._parameters[leaf] = fake
        names[id(fake)] = n
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m, names


class WeightSource:
    """``cfg``, ``get(name, dtype)`` (one CPU tensor by official key), ``nbytes``, ``reference(dtype)`` (the
    model validation runs against), ``memory(dtype)`` (the checkpoint's memory state) and ``release()``."""

    cfg = None
    dtype: torch.dtype = torch.float32  # the stored dtype of the float weights

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def get_rows(self, name: str, a: int, b: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``a:b`` of ``name`` (an lm_head block) without reading the rest where the source allows."""
        t = self.get(name)[a:b]
        return t if dtype is None else t.to(dtype)

    def reference(self, dtype: torch.dtype):
        raise NotImplementedError

    def memory(self, dtype: torch.dtype):
        raise NotImplementedError

    def release(self) -> None:
        """Drop a reference model this source loaded itself (frees its weights before ORT loads the graphs)."""


class ModelWeights(WeightSource):
    def __init__(self, model: MPlus):
        # the stored dtype: under precision.upcast_compute ``model.dtype`` is the compute dtype (fp32)
        self.model, self.cfg, self.dtype = model, model.config, model.model.embed_tokens.weight.dtype
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._cast = None

    @property
    def nbytes(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        return n

    def get(self, name, dtype=None):
        t = self._params[name].detach()
        return t if dtype is None else t.to(dtype)

    def reference(self, dtype):
        if dtype == torch.bfloat16:  # bf16 storage, fp32 compute (precision.upcast_compute), as the graphs
            if self.dtype == torch.bfloat16 and self.model.dtype == torch.float32:
                return self.model  # already that policy
            from mplus_deploy.model.precision import upcast_compute

            ref = _copy_to(self.model, dtype)  # a bf16 model computing in bf16 would miss the fp32 tolerance
            return upcast_compute(ref)
        if self.model.dtype == dtype:
            return self.model
        self._cast = self._cast or _copy_to(self.model, dtype)
        return self._cast

    def memory(self, dtype):
        mem = self.model.memory.clone()
        return _memory_to(mem, dtype)

    def release(self):
        self._cast = None


class CheckpointWeights(WeightSource):
    def __init__(self, path: str | Path):
        from mplus_deploy.model.config import MPlusConfig

        self.path = Path(path)
        self.cfg = MPlusConfig.from_json(self.path)
        self.files = weight_files(self.path)
        floats = {f.entries[k][0] for k, f in self.files.items() if f.entries[k][0].is_floating_point and k != "memory"
                  and not k.startswith("ltm_")}
        self.dtype = floats.pop() if len(floats) == 1 else torch.float32
        self._ref = None

    @property
    def nbytes(self) -> int:
        return sum(f.entries[k][3] for k, f in self.files.items())

    def get(self, name, dtype=None):
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.files[name].read(name, dtype)

    def get_rows(self, name, a, b, dtype=None):
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.files[name].read_rows(name, a, b, dtype)

    def reference(self, dtype):
        if self._ref is None:
            ref = load(self.path, dtype=dtype)
            if dtype == torch.bfloat16:
                from mplus_deploy.model.precision import upcast_compute

                upcast_compute(ref)
            self._ref = ref
        return self._ref

    def memory(self, dtype):
        return load_memory(self.path, self.cfg, dtype)

    def release(self):
        self._ref = None
        gc.collect()


def _copy_to(model: MPlus, dtype: torch.dtype) -> MPlus:
    import copy

    m = copy.deepcopy(model)
    m.to(dtype)
    return m


def _memory_to(mem, dtype):
    conv = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    mem.stm = conv(mem.stm)
    mem.ltm = [conv(t) for t in mem.ltm]
    mem.ltm_keys = [conv(t) for t in mem.ltm_keys]
    mem.pend_vals, mem.pend_keys = conv(mem.pend_vals), conv(mem.pend_keys)
    mem.touch()
    return mem


def weight_source(model_or_path) -> WeightSource:
    if isinstance(model_or_path, WeightSource):
        return model_or_path
    if isinstance(model_or_path, MPlus):
        return ModelWeights(model_or_path)
    return CheckpointWeights(model_or_path)
