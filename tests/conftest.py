import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The tiny preset exported with ``mplus_deploy.build`` (fp32, char tokenizer), once per session."""
    from mplus_deploy import build as exporter

    from .runtime.conftest import char_tokenizer, tiny_model

    out = tmp_path_factory.mktemp("art") / "tiny"
    exporter.export_artifact(tiny_model(), out, tokenizer=char_tokenizer(), source={"preset": "tiny"})
    return out


@pytest.fixture(scope="session")
def serve_art(tmp_path_factory):
    """The tiny preset exported with a character tokenizer that has a chat template (mplus-serve tests)."""
    from mplus_deploy.build import export_artifact
    from .runtime.conftest import char_tokenizer, tiny_model

    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    out = tmp_path_factory.mktemp("serve") / "tiny"
    export_artifact(tiny_model(), out, validate=False, tokenizer=tok, source={"preset": "tiny"})
    return out


# Quantized tiny artifacts (calibration tests, the torch backend's quantized weights: tests/runtime).
# small caps: the whole folder must run in < 2 min on 2 cores (demo-level numbers live in the bench/report)
FAST = dict(max_samples=4, max_tokens=48, n_decode=4, max_per_graph=8, eval_texts=3, greedy_tokens=6)


@pytest.fixture(scope="session")
def calib_tiny_art(tmp_path_factory):
    from mplus_deploy.build import export_artifact

    out = tmp_path_factory.mktemp("qart") / "tiny"
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mplus_deploy.model import MPlus, preset

        export_artifact(MPlus.from_config(preset("tiny")), out, validate=False, source={"preset": "tiny"})
    return out


@pytest.fixture(scope="session")
def fp8_art(calib_tiny_art):
    from mplus_deploy.calibration import quantize_artifact

    rep = quantize_artifact(calib_tiny_art, "fp8", "builtin", progress=False, print_table=False, **FAST)
    # the markdown report as fp8 wrote it: int8_art / int4_art (which other folders' tests may build first) rewrite
    # report/quantization.md for their own mode
    rep["report_md"] = (calib_tiny_art / "report" / "quantization.md").read_text()
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
