import warnings

import pytest
import torch

from mplus_deploy.model import MPlus, preset


def _tiny(name="tiny"):
    return MPlus.from_config(preset(name))


@pytest.fixture(scope="session")
def tiny_model():
    return _tiny("tiny")


@pytest.fixture(scope="session")
def tiny_art(tmp_path_factory, tiny_model):
    """The tiny M+ model exported once per session (fp32, validated)."""
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("art") / "tiny"
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_artifact(tiny_model, out, source={"preset": "tiny"})
    return out, report


@pytest.fixture(scope="session")
def mllm_art(tmp_path_factory):
    """tiny-memoryllm exported through the CLI."""
    from mplus_deploy.cli.export import main

    out = tmp_path_factory.mktemp("art") / "tiny-memoryllm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny-memoryllm", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def fp16_art(tmp_path_factory, tiny_model):
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("art") / "tiny-fp16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_artifact(tiny_model, out, precision="fp16")
    return out, report
