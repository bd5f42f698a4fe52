import warnings

import pytest
import torch

from mplus_deploy.model import MPlus, preset

# small caps: the whole folder must run in < 2 min on 2 cores (demo-level numbers live in the bench/report)
FAST = dict(max_samples=4, max_tokens=48, n_decode=4, max_per_graph=8, eval_texts=3, greedy_tokens=6)


@pytest.fixture(scope="session")
def calib_tiny_art(tmp_path_factory):
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("qart") / "tiny"
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(MPlus.from_config(preset("tiny")), out, validate=False, source={"preset": "tiny"})
    return out


@pytest.fixture(scope="session")
def fp8_art(calib_tiny_art):
    from mplus_deploy.calibration import quantize_artifact

    rep = quantize_artifact(calib_tiny_art, "fp8", "builtin", progress=False, print_table=False, **FAST)
    return calib_tiny_art, rep


@pytest.fixture(scope="session")
def int8_art(fp8_art):
    from mplus_deploy.calibration import quantize_artifact

    out, _ = fp8_art
    rep = quantize_artifact(out, "int8", "builtin", progress=False, print_table=False, graphs=("prefill", "decode"),
                            **FAST)
    return out, rep


@pytest.fixture(scope="session")
def int4_art(int8_art):
    from mplus_deploy.calibration import quantize_artifact

    out, _ = int8_art
    rep = quantize_artifact(out, "int4", None, progress=False, print_table=False, graphs=("decode", "prefill"), **FAST)
    return out, rep
