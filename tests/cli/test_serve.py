"""mplus-serve's command line: usage and input errors exit 2 with a message before anything is bound."""
import pytest

from mplus_deploy.cli.serve import main


@pytest.mark.parametrize("argv,msg", [
    (["--port", "0"], "--port 0"), (["--port", "70000"], "--port 70000"), (["--max-resident", "0"], "--max-resident 0"),
    (["--max-queue", "0"], "--max-queue 0"), (["--max-body-mb", "0"], "--max-body-mb"), (["--threads", "0"], "--threads 0"),
])
def test_usage_errors(serve_art, tmp_path, capsys, argv, msg):
    assert main([str(serve_art), "--store", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mplus-serve: error:") and msg in err
    assert not (tmp_path / "s").exists()  # nothing created before the checks passed


def test_missing_artifact_and_a_file_as_store(tmp_path, capsys, serve_art):
    assert main([str(tmp_path / "nope"), "--store", str(tmp_path / "s")]) == 2
    assert "nope" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main([str(serve_art), "--store", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err
