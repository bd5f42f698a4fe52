"""mplus-profile usage errors: exit code 2 and a clear message, before any heavy work."""
import pytest

from mplus_deploy.profiling.cli import UsageError, main, parse_list, parse_size


def test_missing_out(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "OUT" in capsys.readouterr().err


@pytest.mark.parametrize("arg,msg", [
    ("--ltm-sizes=0,abc", "not a size"),
    ("--ltm-sizes=0,-16k", "non-negative"),
    ("--ltm-sizes=,", "empty"),
    ("--ltm-sizes=1.5", "whole number"),
    ("--prompt-lens=0,64", "> 0"),
    ("--repeat=0", "--repeat"),
    ("--new-tokens=0", "--new-tokens"),
    ("--plot=out.jpg", "PNG"),
])
def test_bad_values(tiny_art, capsys, arg, msg):
    assert main([str(tiny_art), arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mplus-profile: error:") and msg in err, err


def test_not_an_artifact(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such artifact" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_bad_compare(tiny_art, tmp_path, capsys):
    assert main([str(tiny_art), "--compare", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_sizes():
    assert parse_size("16k", "x") == 16384 and parse_size("1m", "x") == 1 << 20 and parse_size("0", "x") == 0
    assert parse_size("1.5k", "x") == 1536
    assert parse_list("0,16k,64k,160k", "x") == (0, 16384, 65536, 163840)
    with pytest.raises(UsageError):
        parse_size("k", "x")
