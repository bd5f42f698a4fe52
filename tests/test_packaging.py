"""The wheel is complete (issue 15 item 6): build it, install it (no editable install, no source tree on the
path) and run a quantized export of ``tiny`` from the installed files alone."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import sys, warnings
warnings.simplefilter("ignore")
from mplus_deploy.cli.export import main
rc = main(sys.argv[2:])
target = sys.argv[1]
bad = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "mplus_deploy"
             and getattr(m, "__file__", None) and not m.__file__.startswith(target))
print("NOT FROM TARGET:", bad)
sys.exit(rc if not bad else 99)
"""


def _package_data() -> list[str]:
    """Every non-.py file of the package source (what the package reads at run time)."""
    src = ROOT / "mplus_deploy"
    return sorted(p.relative_to(ROOT).as_posix() for p in src.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from a copy of the sources (the build's own folders never land in the checkout)."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "mplus_deploy", src / "mplus_deploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(d / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (d / "dist").glob("mplus_deploy-*.whl")
    return whl


def test_wheel_holds_every_package_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    need = _package_data()
    assert "mplus_deploy/calibration/heldout_eval.txt" in need and "mplus_deploy/data/calib_builtin.txt" in need
    missing = [f for f in need if f not in names]
    assert missing == [], f"package-data in pyproject.toml misses {missing}"


def test_installed_wheel_runs_a_quantized_export(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "mplus_deploy" / "calibration" / "heldout_eval.txt").is_file()
    run_dir = tmp_path / "elsewhere"  # cwd outside the repository: the checkout is not importable
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), MPLUS_PROGRESS="0", OMP_NUM_THREADS="2")
    out = run_dir / "q"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(target), "tiny", "-o", str(out), "--no-validate", "--int4",
                        "--accept-below-target"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "NOT FROM TARGET: []" in r.stdout
    import json

    from mplus_deploy.artifact import load_manifest

    m = load_manifest(out)
    assert "int4" in m["quantized"] and m["quantized"]["int4"]["report"]["json"] == "report/quantization.json"
    rep = json.loads((out / "report" / "quantization.json").read_text())
    assert rep["mode"] == "int4"
