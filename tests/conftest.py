import os

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
