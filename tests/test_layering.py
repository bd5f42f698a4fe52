"""The dependency rule between packages (docs/design.md "Layers"), asserted on the import graph: every
``import`` / ``from ... import`` of the package's modules, at module level or inside functions."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mplus_deploy"
# package -> the mplus_deploy packages it must never import
FORBIDDEN = {
    "artifact": {"export", "runtime", "calibration", "profiling", "cli", "plugins"},
    "export": {"runtime", "calibration", "profiling", "cli", "serve"},
    "runtime": {"export", "calibration", "profiling", "cli", "serve"},
    "model": {"artifact", "export", "runtime", "calibration", "profiling", "cli"},
    "util": {"artifact", "model", "export", "runtime", "calibration", "profiling", "cli", "plugins"},
    "profiling": {"export", "calibration", "cli", "build"},
    "calibration": {"profiling", "cli"},
    "build": {"calibration", "profiling", "cli", "serve"},
    "serve": {"export", "calibration", "profiling", "build", "cli", "evaluation"},
    "evaluation": {"export", "calibration", "profiling", "build", "cli", "serve"},
    "training": {"artifact", "export", "runtime", "calibration", "profiling", "build", "cli", "serve"},
    "plugins": {"artifact", "export", "runtime", "calibration", "profiling", "build", "cli", "serve", "evaluation"},
}


def _imports(path: Path, root: Path) -> set[str]:
    """The mplus_deploy packages ``path`` imports (relative imports resolved)."""
    parts = path.relative_to(root.parent).with_suffix("").parts  # ("mplus_deploy", pkg, ..., module)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:-node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] + [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
            else:
                names = [node.module or ""] + ([f"{node.module}.{a.name}" for a in node.names]
                                                if node.module == "mplus_deploy" else [])
        else:
            continue
        out.update(n.split(".")[1] for n in names if n.startswith("mplus_deploy.") and n.count(".") >= 1)
    return out


def _violations(pkg: str, root: Path = PKG) -> list[str]:
    bad = []
    for p in sorted((root / pkg).rglob("*.py")):
        hit = _imports(p, root) & FORBIDDEN[pkg]
        bad += [f"{p.relative_to(root.parent).as_posix()} imports mplus_deploy.{h}" for h in sorted(hit)]
    return bad


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_dependency_rule(pkg):
    assert _violations(pkg) == []


def test_the_rule_sees_relative_and_function_level_imports(tmp_path):
    """The checker itself: a relative import and one inside a function are both found."""
    fake = tmp_path / "mplus_deploy"
    (fake / "export").mkdir(parents=True)
    (fake / "export" / "x.py").write_text("from ..runtime import engine\n\ndef f():\n    import mplus_deploy.calibration.quantize\n")
    assert _violations("export", fake) == ["mplus_deploy/export/x.py imports mplus_deploy.calibration",
                                     "mplus_deploy/export/x.py imports mplus_deploy.runtime"]
