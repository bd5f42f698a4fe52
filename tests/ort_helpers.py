"""A plain onnxruntime CPU session for tests that check one exported graph directly (the package itself runs
graphs only through ``runtime``'s runners)."""
import numpy as np
import onnxruntime as ort
import torch


def ort_session(path, constant_folding: bool = True):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    off = [] if constant_folding else ["ConstantFolding"]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)


def to_feed(t: torch.Tensor, precision: str) -> np.ndarray:
    if t.dtype.is_floating_point:
        return t.detach().to(torch.float32).numpy().astype({"fp32": np.float32, "fp16": np.float16}[precision])
    return t.detach().numpy().astype(np.int64)
