"""Bad inputs fail before any compute with a clear message, and leave the memory untouched."""
import numpy as np
import pytest
import torch

from mplus_deploy.runtime import ArtifactError, BackendUnavailable, Engine
from mplus_deploy.runtime.backends import tensorrt_importable

from .conftest import tiny_model


@pytest.fixture(scope="module")
def eng():
    return Engine(tiny_model(), backend="torch", seed=0)


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([1.5, 2.0], "integers"),
    (np.array([0.5]), "integers"),
    ([[1, 2], [3, 4]], "batch 1"),
    ([1, 256], "outside the vocabulary"),
    ([-1, 3], "outside the vocabulary"),
    ("some text", "no tokenizer"),
    ("", "empty"),
    (torch.tensor([True, False]), "integers"),
])
def test_memorize_rejects(eng, bad, match):
    before = eng.host_memory.clone()
    with pytest.raises(ValueError, match=match):
        eng.memorize(bad, progress=False)
    assert eng.host_memory.equal(before)


def test_generate_rejects(eng):
    with pytest.raises(ValueError, match="exceeds the generation window of 64"):
        eng.generate_ids(list(range(10)), max_new_tokens=55)
    eng.generate_ids(list(range(10)), max_new_tokens=54)  # exactly the window is fine
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate_ids([1, 2], max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate_ids([1, 2], max_new_tokens=2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate_ids([1, 2], max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.generate("hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="chunk_size"):
        eng.memorize([1, 2, 3], chunk_size=0)
    assert len(eng.generate_ids([1, 2], max_new_tokens=0)) == 0


def test_empty_ltm_is_an_error_not_a_hang():
    m = tiny_model()
    m.memory.ltm = [t[:0] for t in m.memory.ltm]
    m.memory.ltm_keys = [t[:0] for t in m.memory.ltm_keys]
    m.memory.ltm_ages = [t[:0] for t in m.memory.ltm_ages]
    m.memory.ltm_rf = [t[:0] for t in m.memory.ltm_rf]
    e = Engine(m, backend="torch")
    with pytest.raises(ValueError, match="long-term memory is empty"):
        e.generate_ids([1, 2, 3], max_new_tokens=2)


def test_engine_construction_errors(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine("tiny", backend="tflite")
    with pytest.raises(ValueError, match="device must be"):
        Engine("tiny", backend="torch", device="tpu")
    with pytest.raises(ArtifactError, match="not a preset"):
        Engine(str(tmp_path / "nope"), backend="torch")
    with pytest.raises(ArtifactError, match="neither an exported artifact"):
        Engine(str(tmp_path), backend="torch")
    with pytest.raises(ValueError, match="needs an exported artifact"):
        Engine("tiny", backend="onnxruntime")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch.cuda.is_available"):
            Engine("tiny", backend="torch", device="cuda")


def test_preset_name_and_auto_backend():
    e = Engine("tiny", backend="auto", seed=0)
    assert e.backend == "torch"
    assert e.memory["ltm_rows"] == [24, 24]


@pytest.mark.skipif(tensorrt_importable(), reason="tensorrt is installed here")
def test_tensorrt_missing_is_a_clear_error(tmp_path):
    from mplus_deploy.runtime.backends.tensorrt_runner import import_tensorrt

    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        import_tensorrt()


@pytest.mark.parametrize("damage", ["bad json", "format 99", "sha256", "missing file", "no config", "no memory"])
def test_every_unusable_artifact_raises_the_runtime_artifact_error(tiny_artifact, tmp_path, damage):
    """One ArtifactError (``mplus_deploy.runtime``'s is the artifact package's, a ValueError) for every way an
    artifact can be unusable, at ``Engine(path)``; the message names the file."""
    import json
    import shutil

    import mplus_deploy.artifact
    import mplus_deploy.export

    assert ArtifactError is mplus_deploy.artifact.ArtifactError is mplus_deploy.export.ArtifactError
    assert issubclass(ArtifactError, ValueError)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    man = bad / "manifest.json"
    m = json.loads(man.read_text())
    if damage == "bad json":
        man.write_text(man.read_text()[:-10])
    elif damage == "format 99":
        man.write_text(json.dumps({**m, "format_version": 99}))
    elif damage == "sha256":
        p = bad / "graphs" / "decode.onnx"
        b = bytearray(p.read_bytes())
        b[-1] ^= 0x01
        p.write_bytes(bytes(b))
    elif damage == "missing file":
        (bad / "graphs" / "prefill.onnx").unlink()
    elif damage == "no config":
        man.write_text(json.dumps({k: v for k, v in m.items() if k != "config"}))
    else:
        shutil.rmtree(bad / "memory")
        man.write_text(json.dumps({**m, "files": {k: v for k, v in m["files"].items() if not k.startswith("memory/")}}))
    with pytest.raises(ArtifactError, match="manifest.json|decode.onnx|prefill.onnx|initial") as e:
        Engine(bad, backend="onnxruntime").generate_ids([1, 2, 3], max_new_tokens=1)
    assert e.value.files

