"""mplus-export never destroys before it succeeds (issue 15, item 5): every option is checked before any
file is touched, the artifact is built (export + quantization) in a hidden folder beside OUT and swapped in
at the end; a refused, failed or interrupted export leaves OUT exactly as it was and no staging folder."""
import errno
import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest

from mplus_deploy.cli.export import main
from mplus_deploy.artifact import load_manifest
from mplus_deploy.util.io import StagedDir, remove_stale_staging


def _tree(d: Path) -> dict:
    """Every path under ``d`` (and its content hash): equal trees = untouched."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture()
def existing(tmp_path):
    """An existing OUT (a stand-in artifact: its content must survive every refused or failed export)."""
    out = tmp_path / "art"
    (out / "graphs").mkdir(parents=True)
    (out / "manifest.json").write_text('{"old": true}')
    (out / "graphs" / "decode.onnx").write_bytes(b"old graph bytes")
    return out


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.mark.parametrize("args", [
    # the command: rtn_asym + gptq was refused only after the fp32 export had replaced OUT
    ["--int4", "--calib", "builtin", "--calib-method", "rtn_asym", "--gptq"],
    ["--int4", "--calib", "builtin", "--calib-method", "rtn_asym", "--quant-auto-exclude"],
    ["--int8", "--calib", "builtin", "--calib-method", "rtn_asym"],  # an int4 method for int8
    ["--max-prompt", "100000"],  # beyond max_window=64
    ["--max-chunk", "100000"],  # beyond the model's max_chunk=32
])
def test_refused_before_out_is_touched(existing, capsys, args):
    before = _tree(existing)
    assert main(["tiny", "-o", str(existing), "--overwrite", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("mplus-export: error:"), err
    assert _tree(existing) == before
    assert _siblings(existing) == []  # no staging folder either


def test_refusal_messages_name_the_option(existing, capsys):
    main(["tiny", "-o", str(existing), "--overwrite", "--int4", "--calib", "builtin", "--calib-method", "rtn_asym", "--gptq"])
    err = capsys.readouterr().err
    assert "rtn_asym" in err and "--gptq" in err
    main(["tiny", "-o", str(existing), "--overwrite", "--max-prompt", "100000"])
    err = capsys.readouterr().err
    assert "--max-prompt 100000" in err and "max_window=64" in err
    main(["tiny", "-o", str(existing), "--overwrite", "--max-chunk", "100000"])
    err = capsys.readouterr().err
    assert "--max-chunk 100000" in err and "max_chunk=32" in err


def _fail_in_export(exc):
    def fake(model, out, **kw):
        out = Path(out)
        (out / "graphs").mkdir(parents=True, exist_ok=True)
        (out / "graphs" / "weights.data").write_bytes(b"half written")
        raise exc
    return fake


@pytest.mark.parametrize("exc,rc,msg", [
    (OSError(errno.ENOSPC, "No space left on device"), 2, "out of disk space"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("something the exporter refused"), 2, "something the exporter refused"),
])
def test_failed_or_interrupted_export_keeps_out(existing, capsys, monkeypatch, exc, rc, msg):
    from mplus_deploy import build as exporter

    before = _tree(existing)
    monkeypatch.setattr(exporter, "export_artifact", _fail_in_export(exc))
    assert main(["tiny", "-o", str(existing), "--overwrite", "--no-validate"]) == rc
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert _tree(existing) == before
    assert _siblings(existing) == []


def test_failure_in_quantization_keeps_out(existing, capsys, monkeypatch):
    """The quantization step writes into the artifact too: it runs in the staging folder, before the swap."""
    import mplus_deploy.calibration as calibration

    seen = []

    def boom(out, **kw):
        seen.append(Path(out))
        (Path(out) / "graphs" / "decode.int4.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "quantize_artifact", boom)
    before = _tree(existing)
    assert main(["tiny", "-o", str(existing), "--overwrite", "--no-validate", "--int4"]) == 130
    assert seen and seen[0] != existing and seen[0].parent == existing.parent and seen[0].name.startswith(".")
    assert _tree(existing) == before
    assert _siblings(existing) == []


def test_new_out_not_created_on_failure(tmp_path, monkeypatch, capsys):
    from mplus_deploy import build as exporter

    monkeypatch.setattr(exporter, "export_artifact", _fail_in_export(OSError(errno.ENOSPC, "full")))
    out = tmp_path / "a" / "b" / "art"
    assert main(["tiny", "-o", str(out), "--no-validate"]) == 2
    assert not (tmp_path / "a").exists()  # the parents it created are removed again


def test_read_only_parent_refused(tmp_path, monkeypatch, capsys):
    """-o on a read-only filesystem: exit 2 naming OUT (tests run as root, so the mkdir is made to fail as a
    read-only mount would make it fail)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.mkdir

    def mkdir(path, *a, **k):
        if Path(path).parent == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert main(["tiny", "-o", str(ro / "art"), "--no-validate"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and str(ro / "art") in err and "Traceback" not in err
    assert list(ro.iterdir()) == []


def test_overwrite_swaps_in_a_complete_artifact(existing, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny", "-o", str(existing), "--overwrite", "--no-validate"]) == 0
    m = load_manifest(existing)  # verifies every file's sha256
    assert "old" not in m and (existing / "graphs" / "decode.onnx").read_bytes() != b"old graph bytes"
    assert _siblings(existing) == []
    assert oct(existing.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_quantized_reports_name_out_not_the_staging_folder(tmp_path, monkeypatch):
    """quantize_artifact records the folder it ran in; the committed artifact names OUT, hashes still verify."""
    import mplus_deploy.calibration as calibration

    def fake(out, **kw):
        out = Path(out)
        (out / "report").mkdir(exist_ok=True)
        (out / "report" / "quantization.json").write_text(json.dumps({"artifact": str(out)}))
        (out / "report" / "quantization.md").write_text(f"Artifact `{out}`\n")
        from mplus_deploy.artifact import hash_files
        m = json.loads((out / "manifest.json").read_text())
        m["files"] = hash_files(out)
        (out / "manifest.json").write_text(json.dumps(m))
        return {"meets_target": True, "end_to_end": {"top1_agreement": 1.0}, "target": {"top1_agreement": 0.9}}

    monkeypatch.setattr(calibration, "quantize_artifact", fake)
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tiny", "-o", str(out), "--no-validate", "--int4"]) == 0
    assert json.loads((out / "report" / "quantization.json").read_text())["artifact"] == str(out)
    assert (out / "report" / "quantization.md").read_text() == f"Artifact `{out}`\n"
    load_manifest(out)


def test_staged_dir_commit_replaces_only_when_complete(tmp_path):
    t = tmp_path / "out"
    t.mkdir()
    (t / "old").write_text("1")
    s = StagedDir(t, tag="export")
    (s.path / "new").write_text("2")
    assert (t / "old").exists()  # untouched until the commit
    s.commit()
    assert sorted(os.listdir(t)) == ["new"] and os.listdir(tmp_path) == ["out"]
    with StagedDir(t, tag="export") as s2:
        (s2.path / "x").write_text("3")
    assert sorted(os.listdir(t)) == ["new"] and os.listdir(tmp_path) == ["out"]


def test_stale_staging_of_dead_process_removed(tmp_path):
    t = tmp_path / "out"
    dead = tmp_path / ".out.export-999999999-abc"
    dead.mkdir()
    live = tmp_path / f".out.export-{os.getppid()}-abc"
    live.mkdir()
    assert remove_stale_staging(t, "export") == [dead]
    assert not dead.exists() and live.exists()
