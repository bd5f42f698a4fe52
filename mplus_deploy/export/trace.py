"""Tracing a graph family into a weightless ONNX proto (docs/design-export.md "Streaming export"):
TorchScript with the parameters as trailing inputs, then opset conversion and deterministic, scope-based
node and initializer names. ``bind.bind_weights`` attaches the weights in between."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .common import TORCHSCRIPT_MAX_OPSET, GraphSpec

class _WeightsAsInputs(nn.Module):
    """``module`` with its parameters passed as trailing forward arguments: each parameter slot is pointed
    at its input for the call, then restored (``functional_call`` refuses to run under the tracer).
    TorchScript's exporter copies every *parameter* into its parameter dict (measured: the zero-stride
    skeleton of a one-layer mplus-8b graph became 6.5 GB of fp32 during export); plain inputs are only
    described by shape and dtype."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module  # "/m/" is stripped from node names (rename_nodes); its slots are emptied while tracing
        first: dict[int, str] = {}
        self.slots: list[tuple[nn.Module, str, str]] = []  # (owner, leaf, canonical name); tied weights share one
        for full, p in module.named_parameters(remove_duplicate=False):
            canon = first.setdefault(id(p), full)
            owner_name, _, leaf = full.rpartition(".")
            self.slots.append((module.get_submodule(owner_name) if owner_name else module, leaf, canon))
        self.names = list(dict.fromkeys(c for _, _, c in self.slots))

    def forward(self, *args):
        n = len(args) - len(self.names)
        ws = dict(zip(self.names, args[n:]))
        for m, leaf, canon in self.slots:
            m._parameters[leaf] = ws[canon]
        try:
            return self.m(*args[:n])
        finally:
            for m, leaf, _ in self.slots:
                m._parameters[leaf] = None

    def emptied(self):
        """Context: the parameter slots hold None (the exporter sees no parameters), restored after."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved = [(m, leaf, m._parameters[leaf]) for m, leaf, _ in self.slots]
            for m, leaf, _ in self.slots:
                m._parameters[leaf] = None
            try:
                yield
            finally:
                for m, leaf, p in saved:
                    m._parameters[leaf] = p
        return ctx()


def trace(module: nn.Module, args: tuple, spec: GraphSpec, path: Path) -> onnx.ModelProto:
    """TorchScript trace of ``module`` (docs/design-export.md: 10-20x faster than dynamo here, scope names
    for free) with its parameters as graph inputs named by its state dict: no weight bytes in the proto,
    no constant folding (which would materialize transposed copies). ``bind.bind_weights`` turns those
    inputs into external initializers; :func:`finish` sets the opset and the node names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _WeightsAsInputs(module)
    names = wrapped.names
    weights = dict(module.named_parameters())
    dyn = spec.dynamic_axes()
    args = tuple(args) + tuple(weights[n] for n in names)
    with warnings.catch_warnings(), wrapped.emptied():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                wrapped, args, str(path), dynamo=False,
                opset_version=TORCHSCRIPT_MAX_OPSET,
                input_names=[i.name for i in spec.inputs] + names, output_names=[o.name for o in spec.outputs],
                dynamic_axes=dyn, do_constant_folding=False,
            )
    return onnx.load(str(path), load_external_data=False)


def finish(model: onnx.ModelProto, spec: GraphSpec, opset: int) -> onnx.ModelProto:
    """``onnx.version_converter`` from TorchScript's opset 20 up to ``opset`` (the proto holds no weights, so
    it stays far below protobuf's 2 GiB), then deterministic node and initializer names."""
    if opset > TORCHSCRIPT_MAX_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, opset)
    model.producer_name = "mplus-deploy"
    model.graph.name = spec.name
    _drop_initializer_identities(model)
    rename_nodes(model)
    return model


def _drop_initializer_identities(model: onnx.ModelProto) -> None:
    """The exporter's constant dedup leaves ``Identity(initializer)`` nodes (a weight used twice, e.g.
    bos and prompt K/V); consumers read the initializer directly instead."""
    inits = {t.name for t in model.graph.initializer}
    outs = {o.name for o in model.graph.output}
    alias = {}
    keep = []
    for n in model.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outs:
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not alias:
        return
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


_SCOPE_STRIP = re.compile(r"^/(?:m/)?(?:model/)?")
_LORA_SCOPE = re.compile(r"/(default|decoder_adapter)(?:_(\d+))?/")


def _lora_name(m: re.Match) -> str:
    """LoRA branches: the exporter names both ModuleDict children after the adapter key (``decoder_adapter``,
    ``decoder_adapter_1``); they are called A then B."""
    n = int(m.group(2) or 0)
    return f"/lora_{'AB'[n % 2]}.{m.group(1)}" + (f"_{n // 2}" if n >= 2 else "") + "/"


def rename_nodes(model: onnx.ModelProto) -> None:
    """Deterministic, scope-based node names: ``/layers.3/self_attn/q_proj/base_layer/Gemm``.

    The TorchScript exporter already names nodes by module scope (``/layers.3/self_attn/...``);
    unscoped nodes get ``/<graph>/<OpType>_<k>`` in topological order. Duplicates get a ``_<k>`` suffix.
    """
    seen: dict[str, int] = {}
    counters: dict[str, int] = {}
    for node in model.graph.node:
        name = node.name or ""
        if not name.startswith("/") or name.count("/") < 2:
            c = counters.get(node.op_type, 0)
            counters[node.op_type] = c + 1
            name = f"/{model.graph.name or 'graph'}/{node.op_type}_{c}"
        name = _SCOPE_STRIP.sub("/", name)
        name = _LORA_SCOPE.sub(_lora_name, name)
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        node.name = name
    _rename_initializers(model)


def _rename_initializers(model: onnx.ModelProto) -> None:
    """Exporter-made initializer names (``onnx::MatMul_1019``) → ``<first consumer node>:<input slot>``."""
    auto = {t.name for t in model.graph.initializer if t.name.startswith("onnx::") or not t.name}
    if not auto:
        return
    new: dict[str, str] = {}
    taken = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in auto and name not in new:
                cand = f"{node.name}:{slot}"
                while cand in taken:
                    cand += "_"
                new[name] = cand
                taken.add(cand)
    for t in model.graph.initializer:
        if t.name in new:
            t.name = new[t.name]
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in new:
                node.input[slot] = new[name]
