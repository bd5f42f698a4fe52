"""``mplus-run`` end to end on an exported tiny artifact."""
import json
import subprocess
import sys

import pytest

from mplus_deploy.runtime.cli import main


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
    with pytest.raises(SystemExit):
        main([str(tiny_artifact), "--memorize", str(tmp_path / "missing.txt"), "--prompt", "hi"])
    with pytest.raises(SystemExit):
        main([str(tiny_artifact)])
    assert main([str(tiny_artifact), "--quantized", "int8", "--prompt", "hi"]) == 2
    assert "no int8 graphs" in capsys.readouterr().err


def test_export_cli_then_run(tmp_path):
    pytest.importorskip("mplus_deploy.export.cli")
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "mplus_deploy.export.cli", "tiny", "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "mplus_deploy.runtime.cli", str(out), "--ids", "--prompt", "1 2 3",
                        "--max-new-tokens", "4", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.split()) == 4
