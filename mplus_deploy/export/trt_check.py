"""TensorRT-RTX compatibility check on CPU (platform-notes §2.7): parse an exported graph with the ONNX
parser (zero errors) and build a serialized engine with an optimization profile covering every dynamic
axis (ranges from the manifest). RTX engines are not a substitute for TensorRT on H100/H200: this only
proves the parser and builder accept the graphs.
"""
from __future__ import annotations

from pathlib import Path

from mplus_deploy.artifact.graph_io import profile_shapes

try:
    import tensorrt_rtx as trt  # type: ignore
    _reason = None
except Exception as e:  # pragma: no cover - depends on the machine
    trt = None
    _reason = f"tensorrt_rtx cannot be imported: {type(e).__name__}: {e}"


def available() -> bool:
    return trt is not None


def unavailable_reason() -> str | None:
    return _reason


def parse_and_build(onnx_path: Path, shapes: dict[str, tuple], build: bool = True) -> dict:
    """Returns {"errors": [...], "engine_bytes": int | None}. Parses from the file so external data resolves."""
    if trt is None:
        raise RuntimeError(_reason)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        return {"errors": errors or ["parse_from_file returned False"], "engine_bytes": None}
    if not build:
        return {"errors": [], "engine_bytes": None}
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name in shapes:
            mn, opt, mx = shapes[t.name]
            prof.set_shape(t.name, mn, opt, mx)
    config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        return {"errors": ["build_serialized_network returned None"], "engine_bytes": None}
    return {"errors": [], "engine_bytes": int(blob.nbytes)}


def check_artifact(out: Path, graphs: list[str] | None = None, build: bool = True) -> dict[str, dict]:
    from mplus_deploy.artifact import load_manifest

    m = load_manifest(out, verify=False)
    res = {}
    for name, g in m["graphs"].items():
        if graphs is None or name in graphs:
            res[name] = parse_and_build(Path(out) / g["file"], profile_shapes(g), build)
    return res
