"""``mplus-run`` end to end on an exported tiny artifact."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

from mplus_deploy.cli.run import main


def test_cli_text_memorize_generate_and_snapshot(tiny_artifact, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("Alice keeps the key under the blue pot. " * 2)
    snap = tmp_path / "mem.safetensors"
    rc = main([str(tiny_artifact), "--memorize", str(doc), "--prompt", "Where is the key?", "--max-new-tokens", "12",
               "--seed", "3", "--save-memory", str(snap), "--stats", "-q"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip() != ""
    stats = json.loads(out.err.strip().splitlines()[-1])
    assert stats["backend"] == "onnxruntime" and stats["stm_fill"] > 0
    assert snap.exists()
    rc = main([str(tiny_artifact), "--load-memory", str(snap), "--prompt", "Where is the key?", "--max-new-tokens",
               "12", "--stream", "-q"])
    again = capsys.readouterr().out
    assert rc == 0 and again == out.out  # same memory → same greedy text, streamed


def test_cli_ids_and_backends_agree(tiny_artifact, tmp_path, capsys):
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(str(i % 250) for i in range(50)))
    outs = []
    for backend in ("onnxruntime", "torch"):
        assert main([str(tiny_artifact), "--backend", backend, "--memorize", str(f), "--ids", "--prompt", "5,6,7",
                     "--max-new-tokens", "6", "--seed", "1", "-q"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].split()) == 6


def test_cli_errors(tiny_artifact, tmp_path, capsys):
    assert main([str(tiny_artifact), "--prompt", "x" * 60, "--max-new-tokens", "10"]) == 2
    assert "generation window" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--memorize", str(tmp_path / "missing.txt"), "--prompt", "hi"]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert main([str(tiny_artifact)]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main([str(tiny_artifact), "--quantized", "int8", "--prompt", "hi"]) == 2
    assert "no int8 graphs" in capsys.readouterr().err


def test_export_cli_then_run(tmp_path):
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "mplus_deploy.cli.export", "tiny", "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "mplus_deploy.cli.run", str(out), "--ids", "--prompt", "1 2 3",
                        "--max-new-tokens", "4", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.split()) == 4


def _err_exit(capsys, argv):
    """(exit code, stderr) whether main returns or argparse exits."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_cli_memorize_inputs_named(tiny_artifact, tmp_path, capsys):
    art = str(tiny_artifact)
    rc, err = _err_exit(capsys, [art, "--memorize", str(tmp_path), "--prompt", "hi"])
    assert rc == 2 and "is a directory" in err and str(tmp_path) in err and "no such file" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    rc, err = _err_exit(capsys, [art, "--memorize", str(empty), "--prompt", "hi"])
    assert rc == 2 and str(empty) in err and "empty" in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    rc, err = _err_exit(capsys, [art, "--memorize", str(latin), "--prompt", "hi"])
    assert rc == 2 and str(latin) in err and "not UTF-8" in err


def test_cli_ids_not_integers(tiny_artifact, tmp_path, capsys):
    rc, err = _err_exit(capsys, [str(tiny_artifact), "--ids", "--prompt", "1 two 3"])
    assert rc == 2 and "--prompt" in err and "'two'" in err and "integers" in err
    f = tmp_path / "ids.txt"
    f.write_text("4 5 x6")
    rc, err = _err_exit(capsys, [str(tiny_artifact), "--ids", "--memorize", str(f), "--prompt", "1"])
    assert rc == 2 and str(f) in err and "'x6'" in err


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_cli_threads_refused(tiny_artifact, capsys, threads):
    rc, err = _err_exit(capsys, [str(tiny_artifact), "--threads", threads, "--prompt", "hi"])
    assert rc == 2 and f"--threads {threads}" in err


def test_cli_default_max_new_tokens_over_window(tiny_artifact, capsys):
    rc, err = _err_exit(capsys, [str(tiny_artifact), "--prompt", "hello", "-q"])  # default 256 > window 64
    assert rc == 2 and "generation window of 64 tokens" in err and "--max-new-tokens 256" in err
    assert "pass --max-new-tokens" in err and "keep the prompt short" not in err


def test_cli_max_prompt_from_manifest_enforced(tiny_artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["limits"]["max_prompt"] = 4  # as if exported with --max-prompt 4 (limits are not in the file hashes)
    (art / "manifest.json").write_text(json.dumps(m))
    rc, err = _err_exit(capsys, [str(art), "--ids", "--prompt", "1 2 3 4 5 6", "--max-new-tokens", "2", "-q"])
    assert rc == 2 and "max_prompt=4" in err and "6 tokens" in err
    assert main([str(art), "--ids", "--prompt", "1 2 3 4", "--max-new-tokens", "2", "-q"]) == 0


def test_cli_chunk_size_capped_at_exported_max_chunk(tiny_artifact, tmp_path, capsys, monkeypatch):
    import shutil

    from mplus_deploy.runtime import engine as engine_mod

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["limits"]["max_chunk"] = 16
    (art / "manifest.json").write_text(json.dumps(m))
    seen = []
    real = engine_mod.Session.memorize

    def spy(self, text, chunk_size=512, progress=True):
        seen.append(chunk_size)
        return real(self, text, chunk_size=chunk_size, progress=progress)

    monkeypatch.setattr(engine_mod.Session, "memorize", spy)
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(str(i % 250) for i in range(40)))
    assert main([str(art), "--ids", "--memorize", str(f), "--stats", "-q"]) == 0
    assert seen == [16]
    rc, err = _err_exit(capsys, [str(art), "--chunk-size", "0", "--prompt", "hi"])
    assert rc == 2 and "--chunk-size 0" in err


def test_cli_save_memory_destinations(tiny_artifact, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    art = str(tiny_artifact)
    rc, err = _err_exit(capsys, [art, "--ids", "--prompt", "1 2", "--max-new-tokens", "1", "--save-memory", str(tmp_path)])
    assert rc == 2 and "is a directory" in err and "--save-memory" in err
    rc, err = _err_exit(capsys, [art, "--ids", "--prompt", "1 2", "--max-new-tokens", "1", "--save-memory",
                                 str(tmp_path / "no" / "m.safetensors")])
    assert rc == 2 and "does not exist" in err
    # read-only filesystem: root ignores chmod, so the probe's file creation fails as on a read-only mount
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(ro))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc, err = _err_exit(capsys, [art, "--ids", "--prompt", "1 2", "--max-new-tokens", "1", "--save-memory",
                                 str(ro / "m.safetensors")])
    assert rc == 2 and "read-only" in err and str(ro / "m.safetensors") in err


def test_cli_save_memory_disk_full(tiny_artifact, tmp_path, capsys, monkeypatch):
    import errno

    from mplus_deploy.runtime import engine as engine_mod

    target = tmp_path / "m.safetensors"

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(engine_mod.Session, "save_memory", full)
    rc, err = _err_exit(capsys, [str(tiny_artifact), "--ids", "--prompt", "1 2", "--max-new-tokens", "1",
                                 "--save-memory", str(target), "-q"])
    assert rc == 2 and "disk is full" in err and str(target) in err


def test_cli_truncated_graph_with_updated_hash(tiny_artifact, tmp_path, capsys):
    import hashlib
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    f = art / "graphs" / "decode.onnx"
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["graphs/decode.onnx"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))
    rc, err = _err_exit(capsys, [str(art), "--ids", "--prompt", "1 2", "--max-new-tokens", "1", "-q"])
    assert rc == 2 and str(f) in err and "not a valid ONNX graph" in err and "re-export" in err
