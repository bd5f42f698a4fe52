"""An artifact's quantized weights on the torch backend (``Engine(OUT, backend="torch", quantized="fp8"|"int4")``).

The weights and scales come from the artifact's own quantized graphs (``graphs/<name>.<mode>.onnx``, the files
``OrtRunner(quantized=mode)`` runs), so both backends compute with the same bytes and the same ModelOpt scales:

- **fp8** (ModelOpt W8A8, or weight-only): a weight ``DequantizeLinear(W^T e4m3 [K, N], s_w [N], axis 1)``; the
  activation ``Q→DQ`` pair in front of the MatMul gives the static per-tensor ``s_a``. Here
  ``_scaled_mm(e4m3(x / s_a), W^T, s_a, 1) * s_w``: the fp8 GEMM of ``torch._scaled_mm`` (CPU and CUDA), the
  per-channel weight scale applied to its output (it factors out of the sum, so this is the graph's math);
- **int4** blocked ``DequantizeLinear`` (ModelOpt ``rtn_dq`` / AWQ: signed int4 ``[K, N]``, scale ``[K/B, N]``) and
  ``rtn_asym``'s ``MatMulNBits`` (+ its block-offset MatMul, ``calibration/asym_int4.py``): both are
  ``w = (q - 8) s + z`` per block of B input channels, which is exactly the layout of torch's tinygemm
  kernels: ``_weight_int4pack_mm`` (CUDA, bf16) and ``_weight_int4pack_mm_for_cpu``.

Which LoRA branch runs is read from the graph too: a graph may keep the low-rank branch beside the quantized
base weight (then it reads the same, possibly quantized, activation the base MatMul reads) or have it merged
into the quantized weight (``merge_lora``; then no branch runs). Per-graph scales differ (each graph is
calibrated on its own), so every ``QuantizedLinear`` holds one spec per graph and the runner says which graph
is running (``GraphScope``); graphs the section does not quantize run the fp32 module unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODES = ("fp8", "int4")
FP8_MAX = 448.0  # E4M3FN: QuantizeLinear saturates here (onnx saturate=1)
# torch runner graph -> the artifact graph whose quantized weights it runs
GRAPH_OF = {"memory_update": "memory_update", "memory_update_short": "memory_update_short",
            "memory_project": "memory_project", "prefill": "prefill", "decode": "decode", "decode_batch": "decode"}


class GraphScope:
    """Which artifact graph the runner is executing (``QuantizedLinear`` picks that graph's spec)."""

    def __init__(self):
        self.graph: str | None = None


@dataclass
class QSpec:
    kind: str  # "fp8" | "int4"
    key: tuple  # names the weight's bytes (its external data, the scales): graphs reading the same share one copy
    load: object  # () -> host tensors; fp8: w [N, K] e4m3, s_w [N]; int4: q [N, K] uint8 0..15, s, z [K/B, N]
    act_scale: float | None = None  # fp8 W8A8: the static activation scale of the GEMM's input
    block: int = 0
    lora: bool = False  # the graph runs the LoRA branch beside this weight
    pre: tuple = ()  # fake-quant scales applied to the input first (a Q/DQ upstream of a slice of it)
    lora_chain: tuple = ()  # fake-quant scales of the LoRA branch's input


# ------------------------------------------------------------------------------------------- reading
def _array(init, root: Path) -> np.ndarray:
    """An initializer's values (external data memory-mapped); int4 unpacked to int8, e4m3 as uint8 bits."""
    from onnx import TensorProto, numpy_helper

    T = TensorProto
    shape = tuple(init.dims)
    n = int(np.prod(shape)) if shape else 1
    packed = init.data_type in (T.INT4, T.UINT4)
    if init.data_location == T.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        dt = np.uint8 if packed or init.data_type == T.FLOAT8E4M3FN else numpy_helper.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = (n + 1) // 2 if packed else n
        raw = np.memmap(root / "graphs" / info["location"], dtype=dt, mode="r", offset=int(info.get("offset", 0)),
                        shape=(count,))
    elif packed or init.data_type == T.FLOAT8E4M3FN:
        raw = np.frombuffer(init.raw_data, dtype=np.uint8)
    else:
        return numpy_helper.to_array(init)
    if not packed:
        return np.asarray(raw).reshape(shape)
    lo, hi = raw & 0x0F, raw >> 4
    nib = np.stack([lo, hi], -1).reshape(-1)[:n].astype(np.int8)
    if init.data_type == T.INT4:
        nib = np.where(nib > 7, nib - 16, nib).astype(np.int8)
    return nib.reshape(shape)


def _module_of_weights(src) -> dict:
    """fp32 graph: MatMul node name prefix ("/layers.0/q_proj/base_layer") -> module path of the linear
    ("model.layers.0.self_attn.q_proj"; a LoRA linear's ``base_layer`` maps to the LoRA module)."""
    inits = {i.name for i in src.graph.initializer}
    out = {}
    for node in src.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("/MatMul") and node.input[1] in inits \
                and node.input[1].endswith(".weight.T") and "lora_" not in node.input[1]:
            mod = node.input[1][: -len(".weight.T")]
            out[node.name[: -len("/MatMul")]] = mod[: -len(".base_layer")] if mod.endswith(".base_layer") else mod
    return out


_VIEWS = ("Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _chain(name: str, prod: dict, inits: dict, arr) -> tuple:
    """The activation fake-quant scales a tensor went through, source first: ``DQ(Q(x))`` adds its scale, ops
    that only select or reshape elements (which commute with elementwise fake-quant) are looked through."""
    n = prod.get(name)
    if n is None:
        return ()
    if n.op_type == "DequantizeLinear" and n.input[1] in inits and n.input[0] not in inits:
        q = prod.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise ValueError(f"{n.name}: an activation DequantizeLinear not fed by a QuantizeLinear")
        return _chain(q.input[0], prod, inits, arr) + (float(arr(n.input[1]).reshape(())),)
    if n.op_type in _VIEWS:
        return _chain(n.input[0], prod, inits, arr)
    return ()


def _lora_node(nodes: dict, prefix: str):
    parent = prefix[: -len("/base_layer")] if prefix.endswith("/base_layer") else prefix
    return next((n for name, n in nodes.items() if name.startswith(parent + "/lora_A.") and name.endswith("/MatMul")), None)


def read_graph(q_path: Path, src_path: Path, root: Path) -> dict:
    """``{scope: {module path: QSpec}}`` for every quantized linear of one quantized graph (weights read lazily).
    ``scope`` is the graph's name, or ``<graph>/bos`` for the prefill's own bos-row nodes (``/layers.l/bos/...``:
    their own activation scales)."""
    import onnx

    src = onnx.load(str(src_path), load_external_data=False)
    prefixes = _module_of_weights(src)
    del src
    m = onnx.load(str(q_path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    prod = {o: n for n in m.graph.node for o in n.output}
    arr = lambda name: _array(inits[name], root)  # noqa: E731
    chain = lambda name: _chain(name, prod, inits, arr)  # noqa: E731
    specs, packed = {}, _nbits_members(m.graph.node, nodes, inits, arr)
    for prefix, mod in prefixes.items():
        mm, nb = nodes.get(prefix + "/MatMul"), packed.get(prefix)
        if nb is not None:
            sp, ch = _nbits_spec(*nb, arr, inits), chain(nb[0].input[0])
        elif mm is not None and (dq := prod.get(mm.input[1])) is not None and dq.op_type == "DequantizeLinear" \
                and dq.input[0] in inits:
            sp, ch = _dq_spec(dq, inits, arr), chain(mm.input[0])
        elif mm is not None and (ch := chain(mm.input[0])):
            sp = QSpec("fq", None, None)  # a high-precision weight reading a quantized activation (e.g. key_proj)
        else:
            continue  # this linear runs in high precision on its own input in this graph
        if sp.kind == "fp8" and ch:
            sp.pre, sp.act_scale = ch[:-1], ch[-1]
        else:
            sp.pre = ch  # int4 is weight-only: a quantized input is only fake-quantized
        a = _lora_node(nodes, prefix)
        sp.lora, sp.lora_chain = a is not None, (chain(a.input[0]) if a is not None else ())
        specs.setdefault("/bos" if "/bos/" in prefix else "", {})[mod] = sp
    return specs


def _attr(node, name: str, default=None):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _key(inits, names) -> tuple:
    """The bytes a spec reads: external (location, offset) of each initializer, or its inline bytes' hash."""
    out = []
    for n in names:
        i = inits[n]
        info = {e.key: e.value for e in i.external_data}
        out.append((info["location"], info.get("offset", "0")) if info else hash(i.raw_data or i.SerializeToString()))
    return tuple(out)


def _dq_spec(dq, inits, arr) -> QSpec:
    from onnx import TensorProto as T

    w = inits[dq.input[0]]
    names = [n for n in dq.input if n]
    zero = arr(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if w.data_type == T.FLOAT8E4M3FN:
        if _attr(dq, "axis", 1) != 1 or (zero is not None and np.any(zero.view(np.uint8) & 0x7F)):
            raise ValueError(f"{dq.name}: expected a per-output-channel fp8 weight DQ (axis 1, zero zero point)")

        def load():
            wq = torch.from_numpy(np.ascontiguousarray(arr(dq.input[0]).T)).view(torch.float8_e4m3fn)  # [N, K]
            s = np.broadcast_to(arr(dq.input[1]).astype(np.float32), (wq.shape[0],))
            return {"w": wq, "s_w": torch.from_numpy(np.array(s, dtype=np.float32))}

        return QSpec("fp8", _key(inits, names), load)
    if w.data_type == T.INT4:
        B = int(_attr(dq, "block_size", 0))
        if _attr(dq, "axis", 0) != 0 or B <= 0:
            raise ValueError(f"{dq.name}: expected an int4 weight DQ blocked along K (axis 0, block_size > 0)")

        def load():
            q = torch.from_numpy(np.ascontiguousarray((arr(dq.input[0]).T + 8).astype(np.uint8)))  # [N, K] 0..15
            s = torch.from_numpy(arr(dq.input[1]).astype(np.float32))  # [K/B, N]
            z = -torch.from_numpy(zero.astype(np.float32)) * s if zero is not None else torch.zeros_like(s)
            return {"q": q, "s": s, "z": z}

        return QSpec("int4", _key(inits, names), load, block=B)
    raise ValueError(f"{dq.name}: weight type {T.DataType.Name(w.data_type)} is not fp8/int4; the torch backend runs "
                     "quantized='fp8' or 'int4' (int8 runs on backend='onnxruntime')")


def _nbits_members(graph_nodes, nodes: dict, inits: dict, arr) -> dict:
    """MatMul name base → (its ``MatMulNBits`` node, the block-offset node or None, its column range) for every
    member of every ``MatMulNBits`` (``asym_int4``'s packed groups: members in column order, sizes in the
    group's ``Split``; older artifacts' ``block_offset/MatMul`` as well as the ``Gemm``)."""
    from mplus_deploy.artifact.graph_forms import members

    out = {}
    for nb in graph_nodes:
        if nb.op_type != "MatMulNBits" or not nb.name.endswith("/MatMulNBits"):
            continue
        base = nb.name[: -len("/MatMulNBits")]
        names = members(base)
        off = nodes.get(base + "/block_offset/Gemm") or nodes.get(base + "/block_offset/MatMul")
        split = nodes.get(base + "/Split")
        sizes = [int(_attr(nb, "N"))] if split is None else [int(v) for v in arr(split.input[1])]
        if len(sizes) != len(names):
            raise ValueError(f"{nb.name}: {len(names)} packed members but {len(sizes)} split sizes")
        c = 0
        for name, n in zip(names, sizes):
            out[name] = (nb, off, (c, c + n))
            c += n
    return out


def _nbits_spec(nb, offset_mm, cols, arr, inits) -> QSpec:
    if len(nb.input) > 3 and nb.input[3]:
        raise ValueError(f"{nb.name}: MatMulNBits with explicit zero points is not read by the torch backend")
    K, N, B = int(_attr(nb, "K")), int(_attr(nb, "N")), int(_attr(nb, "block_size"))
    if int(_attr(nb, "bits", 4)) != 4:
        raise ValueError(f"{nb.name}: only 4-bit MatMulNBits is supported")
    c0, c1 = cols  # this linear's output columns of a packed node

    def load():
        raw = arr(nb.input[1]).reshape(N, -1)[c0:c1]
        q = np.stack([raw & 0x0F, raw >> 4], -1).reshape(c1 - c0, -1)[:, :K]  # low nibble first, zero point 8
        s = torch.from_numpy(arr(nb.input[2]).astype(np.float32).reshape(N, K // B)[c0:c1].T.copy())
        z = (torch.from_numpy(arr(offset_mm.input[1]).astype(np.float32)[:, c0:c1].copy()) if offset_mm is not None
             else torch.zeros_like(s))  # rtn_asym's block offset min + 8 d
        return {"q": torch.from_numpy(np.ascontiguousarray(q)), "s": s, "z": z}

    names = list(nb.input[1:3]) + ([offset_mm.input[1]] if offset_mm is not None else [])
    return QSpec("int4", _key(inits, names) + (cols,), load, block=B)


def read_artifact(root: Path, manifest: dict, mode: str) -> dict:
    """``{scope: {module path: QSpec}}`` of the manifest's ``quantized[mode]`` section (``read_graph``'s scopes)."""
    if mode not in MODES:
        raise ValueError(f"backend='torch' runs quantized='fp8' or 'int4', got {mode!r} "
                         "(int8 runs on backend='onnxruntime')")
    sec = (manifest.get("quantized") or {}).get(mode)
    if not sec:
        have = sorted(manifest.get("quantized") or {}) or "none"
        raise ValueError(f"quantized={mode!r}: the artifact has no {mode} graphs (it has: {have}); add them with "
                         f"`mplus-export SRC -o OUT --{mode}`")
    root = Path(root)
    return {g + sub: specs for g, e in sec["graphs"].items() if g in GRAPH_OF.values() and e.get("file")
            for sub, specs in read_graph(root / e["file"], root / e["source"], root).items()}


# ------------------------------------------------------------------------------------------- kernels
def fp8_matmul(x: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, s_a: float | None,
               scales: tuple | None = None) -> torch.Tensor:
    """x [M, K] (any float) @ dequant(w [N, K] e4m3, s_w [N]).T with x quantized to e4m3 at ``s_a`` (None:
    weight-only, x used as is: the weight is dequantized, as the graph's fp32 MatMul does). ``scales``: the
    (s_a, 1) scalar tensors on x's device, made once (no host-to-device copy per call: CUDA-graph capturable)."""
    if s_a is None:
        return x @ (w.to(x.dtype) * s_w.to(x.dtype)[:, None]).T
    if scales is None:
        scales = (torch.tensor(s_a, device=x.device), torch.ones((), device=x.device))
    xq = (x.float() / s_a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, w.t(), scale_a=scales[0], scale_b=scales[1], out_dtype=torch.float32)
    return (y * s_w).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, s_a: float) -> torch.Tensor:
    """DQ(Q(x)): what a branch reading the graph's quantized activation sees."""
    return ((x.float() / s_a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s_a).to(x.dtype)


def _fq(x: torch.Tensor, scales: tuple) -> torch.Tensor:
    for s in scales:
        x = fake_quant_fp8(x, s)
    return x


class Int4Weight:
    """tinygemm layout of ``w = (q - 8) s + z`` (q [N, K] 0..15; s, z [K/B, N]) on one device."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, block: int, device: torch.device,
                 dtype: torch.dtype):
        self.block, self.cuda = int(block), device.type == "cuda"
        K = q.shape[1]
        tiles = next(t for t in (8, 4, 2, 1) if K % (t * 16) == 0)
        if self.cuda:  # CUDA kernel: bf16, uint8 [N, K/2] with the even element in the high nibble
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            self.w = torch._convert_weight_to_int4pack(packed, tiles)
            self.sz = torch.stack([s, z], -1).to(device, torch.bfloat16).contiguous()
        else:
            self.w = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), tiles)
            self.sz = torch.stack([s, z], -1).to(dtype).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            return torch._weight_int4pack_mm(x.to(torch.bfloat16), self.w, self.block, self.sz).to(x.dtype)
        return torch._weight_int4pack_mm_for_cpu(x.to(self.sz.dtype), self.w, self.block, self.sz).to(x.dtype)


class QuantizedLinear(nn.Module):
    """Stands in for one linear (plain or LoRA) of the reference model: per graph, that graph's quantized
    weight (and its LoRA rule); graphs without a spec run the original module."""

    def __init__(self, orig: nn.Module, specs: dict, scope: GraphScope, weights: dict, device: torch.device):
        super().__init__()
        self.orig, self.scope, self.specs, self.weights = orig, scope, specs, weights
        self._adapter_arg = hasattr(orig, "merged_weight")  # LoRA / plain model linears take the adapter
        self._scales = {g: (torch.tensor(sp.act_scale, device=device), torch.ones((), device=device))
                        for g, sp in specs.items() if sp.act_scale is not None}

    def _fp32(self, x, adapter):
        return self.orig(x, adapter) if self._adapter_arg else self.orig(x)

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        sp = self.specs.get(self.scope.graph)
        if sp is None:
            return self._fp32(x, adapter)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if sp.kind == "fq":
            return self._fp32(_fq(x, sp.pre), adapter)
        xb = _fq(x2, sp.pre)
        w, g = self.weights[sp.key], self.scope.graph
        y = fp8_matmul(xb, w[0], w[1], sp.act_scale, self._scales.get(g)) if sp.kind == "fp8" else w.matmul(xb)
        o = self.orig
        if sp.lora and adapter is not None and adapter in getattr(o, "lora_A", {}):
            y = y + o.lora_B[adapter](o.lora_A[adapter](_fq(x2, sp.lora_chain))) * o.scale
        return y.reshape(*lead, y.shape[-1])


def _prepare(sp: QSpec, device: torch.device, dtype: torch.dtype):
    t = sp.load()
    if sp.kind == "fp8":
        return (t["w"].to(device).contiguous(), t["s_w"].to(device))
    return Int4Weight(t["q"], t["s"], t["z"], sp.block, device, dtype)


def install(model, per_graph: dict, scope: GraphScope, device: torch.device) -> int:
    """Replace every linear of ``model`` that some graph quantizes by a ``QuantizedLinear``; returns how many."""
    by_module: dict = {}
    for g, specs in per_graph.items():
        for mod, sp in specs.items():
            by_module.setdefault(mod, {})[g] = sp
    names = dict(model.named_modules())
    missing = sorted(set(by_module) - set(names))
    if missing:
        raise ValueError(f"quantized weights for {missing[:3]}..., which the model does not have (artifact/model mismatch)")
    weights: dict = {}  # one device copy per distinct weight (prefill and decode usually read the same bytes)
    for mod, specs in by_module.items():
        for sp in specs.values():
            if sp.kind != "fq" and sp.key not in weights:
                weights[sp.key] = _prepare(sp, device, model.dtype)
            sp.load = None  # nothing holds the host arrays any more
        parent, _, child = mod.rpartition(".")
        setattr(names[parent] if parent else model, child, QuantizedLinear(names[mod], specs, scope, weights, device))
    return len(weights)
