"""sigma_core is pure math: it may import only torch, numpy, scipy, tensorly and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ALLOWED = {"torch", "numpy", "scipy", "tensorly", "sigma_core"} | set(sys.stdlib_module_names)
SIGMA_CORE = Path(__file__).resolve().parents[1] / "sigma_core"


def _imported_top_levels(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_sigma_core_imports_only_allowed_modules():
    files = sorted(SIGMA_CORE.rglob("*.py"))
    assert files, f"no Python files found under {SIGMA_CORE}"
    offenders = {}
    for path in files:
        bad = _imported_top_levels(ast.parse(path.read_text(), filename=str(path))) - ALLOWED
        if bad:
            offenders[str(path.relative_to(SIGMA_CORE.parent))] = sorted(bad)
    assert not offenders, (f"sigma_core must import only {sorted(ALLOWED - set(sys.stdlib_module_names))} and "
                           f"the standard library; move these imports to pipeline/: {offenders}")


def test_checker_catches_forbidden_imports():
    tree = ast.parse("import ray\nfrom mlflow.tracking import X\nfrom . import y\nimport os.path\n")
    assert _imported_top_levels(tree) - ALLOWED == {"ray", "mlflow"}
