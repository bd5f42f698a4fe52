"""mplus-profile usage errors: exit code 2 and a clear message, before any heavy work."""
import pytest

from mplus_deploy.cli.profile import UsageError, main, parse_list, parse_size


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


def _read_only(monkeypatch, ro):
    """Creating files in ``ro`` fails as on a read-only mount (root ignores chmod)."""
    import errno
    import tempfile
    from pathlib import Path

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == ro.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(ro))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("flag", ["--plot", "--json", "--markdown"])
def test_output_on_read_only_path_refused_before_the_run(tiny_art, tmp_path, capsys, monkeypatch, flag):
    from mplus_deploy.profiling import profiler

    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    ran = []
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: ran.append(1))
    target = ro / ("p.png" if flag == "--plot" else "p.out")
    assert main([str(tiny_art), flag, str(target)]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and flag in err and str(target) in err
    assert ran == []  # refused before any measurement


def test_output_is_a_directory(tiny_art, tmp_path, capsys):
    d = tmp_path / "x.png"
    d.mkdir()
    assert main([str(tiny_art), "--plot", str(d)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_write_failure_after_run_is_exit_2(tiny_art, tmp_path, capsys, monkeypatch):
    import errno

    from mplus_deploy.profiling import profiler, report

    monkeypatch.setattr(profiler, "profile", lambda *a, **k: {"fake": True})
    monkeypatch.setattr(report, "print_rich", lambda *a, **k: None)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot", full)
    assert main([str(tiny_art), "--plot", str(tmp_path / "p.png"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "--plot" in err
