"""The installed product's imports are honest: every third-party module that server/, engine/ or
kernels/ imports, at load or lazily, belongs to a dependency declared in pyproject.toml, or is an
optional accelerator named here with the reason it may be missing."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[2]
PRODUCT = ("server", "engine", "kernels")
OPTIONAL = {
    "triton": "the GPU kernels; kernels/__init__.py imports them only where triton is importable and a CUDA device runs",
}


def _imported_modules() -> dict[str, Path]:
    """Top-level module name -> one product file importing it (absolute imports only)."""
    found: dict[str, Path] = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], path.relative_to(ROOT))
    return found


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_product_is_a_declared_dependency():
    declared = {_normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
                for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared = []
    for module, where in _imported_modules().items():
        if module in sys.stdlib_module_names or module in PRODUCT or module == "__future__" or module in OPTIONAL:
            continue
        owners = {_normalized(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            undeclared.append(f"{module} (imported by {where}; from {sorted(owners)})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + ", ".join(undeclared)


def test_the_product_does_not_import_the_developer_tools():
    importers = [str(where) for module, where in _imported_modules().items() if module == "bench"]
    assert not importers, f"bench/ is not installed, yet {importers} import it"
