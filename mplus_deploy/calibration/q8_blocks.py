"""8-bit symmetric blocks (llama.cpp's Q8_0 grid) as ``MatMulNBits(bits=8)``: the lm_head of an int4 export.

Per block of ``block_size`` weights along K, ``d = max|w| / 127`` and ``q = round(w / d)`` in -127..127, so
``w ≈ d q``. ``MatMulNBits`` stores ``u = q + 128`` (uint8, one byte a weight) and, without a zero-point
input, subtracts its default zero point 2^(bits-1) = 128: ``(u - 128) d = d q``, exactly the grid, no offset
term (unlike the asymmetric 4-bit grid of :mod:`.asym_int4`).

Why the lm_head: llama.cpp quantizes a Q4_1 model's output matrix (for a tied model, the token embedding)
to Q8_0, not to 4 bits, because the logits are the most sensitive product of the model. The demo's GGUF
(``SmolLM2-135M-Instruct.Q4_1``) stores ``token_embd`` as Q8_0, so its dequantized table lies on this grid
and the pass is lossless for it (:func:`on_grid`); for a bf16 checkpoint it is ordinary 8-bit block RTN.
The fp32 table is 4 bytes a weight (the demo's 113 MB per decode step); this copy is 1 + 4/32.

Speed needs ``accuracy_level`` 4 (activations rounded to int8 inside the kernel, as llama.cpp does against
Q8_0): ORT 1.32 has no fast 8-bit kernel at level 1 (measured on the demo's [576 x 49152] table: 150 ms
against 3.5 ms for the fp32 Gemm and 1.4 ms at level 4).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
CHUNK = 8192  # output columns quantized at a time


def quantize_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] fp32 weight → (q int8 [N, K/block, block] in -127..127, d fp32 [N, K/block])."""
    K, N = w.shape
    if K % block:
        raise ValueError(f"8-bit block size {block} does not divide the input size {K}")
    q, d = np.empty((N, K // block, block), np.int8), np.empty((N, K // block), np.float32)
    for j in range(0, N, CHUNK):  # a real-width lm_head (128k x 4096) is 2 GB in fp32: float64 a slice at a time
        b = w[:, j:j + CHUNK].T.reshape(-1, K // block, block).astype(np.float64)
        dj = np.abs(b).max(-1) / 127.0
        safe = np.where(dj > 0, dj, 1.0)
        q[j:j + CHUNK] = np.clip(np.rint(b / safe[..., None]), -127, 127)
        d[j:j + CHUNK] = dj
    return q, d


def dequantize(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The weight the rewritten graph multiplies by, [K, N]."""
    N, nb, block = q.shape
    return (d[..., None] * q.astype(np.float32)).reshape(N, nb * block).T


def on_grid(w: np.ndarray, block: int = 32) -> bool:
    """Whether a [K, N] weight already lies on the 8-bit symmetric block grid (e.g. dequantized Q8_0)."""
    if w.ndim != 2 or w.shape[0] % block:
        return False
    q, d = quantize_blocks(w, block)
    return bool(np.abs(dequantize(q, d) - w).max() <= 1e-6 * max(float(np.abs(w).max()), 1e-30))


def replace(node: onnx.NodeProto, w: np.ndarray, block_size: int, accuracy_level: int) -> tuple[list, list]:
    """(nodes, initializers) computing ``node``'s ``MatMul(x, w)`` as one 8-bit ``MatMulNBits``; w [K, N] fp32."""
    K, N = w.shape
    q, d = quantize_blocks(w, block_size)
    base = node.name[: -len("/MatMul")] if node.name.endswith("/MatMul") else node.name
    b_name, s_name = f"{base}/int8.B", f"{base}/int8.scales"
    inits = [numpy_helper.from_array(q.view(np.uint8) ^ np.uint8(0x80), b_name),  # = q + 128 as uint8
             numpy_helper.from_array(d.reshape(-1), s_name)]
    mm = helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], [node.output[0]], name=f"{base}/MatMulNBits",
                          domain=MS_DOMAIN, K=K, N=N, bits=8, block_size=block_size, accuracy_level=accuracy_level)
    return [mm], inits


def apply(model: onnx.ModelProto, nodes, block_size: int = 32, accuracy_level: int = 4, base_dir: str = "") -> int:
    """Rewrite the listed weight MatMuls of ``model`` (second input an initializer, first a 2-D [T, K]
    activation) in place as 8-bit ``MatMulNBits``. → number rewritten."""
    want = set(nodes)
    inits = {i.name: i for i in model.graph.initializer}
    uses = input_uses(model)
    new_nodes, new_inits, dead, done = [], [], set(), 0
    for node in model.graph.node:
        if node.name not in want or node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]], base_dir=str(base_dir)).astype(np.float32)
        if w.ndim != 2:
            raise ValueError(f"8-bit blocks: {node.name}: weight must be 2-D, got {w.shape}")
        n_new, i_new = replace(node, w, block_size, accuracy_level)
        new_nodes += n_new
        new_inits += i_new
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            dead.add(node.input[1])
        done += 1
    if not done:
        return 0
    install(model, new_nodes, new_inits, dead)
    return done


def input_uses(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each tensor name (a weight whose count reaches 0 after a rewrite is dropped)."""
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return uses


def install(model: onnx.ModelProto, nodes: list, new_inits: list, dead: set) -> None:
    """Finish a weight-MatMul rewrite in place: ``nodes`` become the graph's, the initializers named in ``dead`` go,
    ``new_inits`` are added, and the ``com.microsoft`` opset is imported (shared with :mod:`.asym_int4`)."""
    keep = [i for i in model.graph.initializer if i.name not in dead]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
