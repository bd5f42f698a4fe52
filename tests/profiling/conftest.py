import json

import pytest

from mplus_deploy.model import MPlus, preset

TINY_ARGS = ["--prompt-lens", "8,24,500", "--ltm-sizes", "2k,0,512", "--new-tokens", "8", "--warmup", "1",
             "--repeat", "3", "--memorize-chunks", "4", "-q"]


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    """The tiny preset exported once per module (fp32, no validation: the exporter's own tests validate)."""
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("prof") / "tiny"
    export_artifact(MPlus.from_config(preset("tiny"), seed=0), out, validate=False, source={"preset": "tiny"})
    return out


@pytest.fixture(scope="module")
def tiny_profile(tiny_art, tmp_path_factory):
    """One CLI run over the tiny artifact: (exit code, JSON, markdown path, plot path)."""
    from mplus_deploy.cli.profile import main

    d = tmp_path_factory.mktemp("out")
    j, md, png = d / "p.json", d / "p.md", d / "p.png"
    rc = main([str(tiny_art), *TINY_ARGS, "--json", str(j), "--markdown", str(md), "--plot", str(png)])
    return rc, json.loads(j.read_text()) if j.exists() else None, md, png
