"""The product's imports: honest about third-party dependencies, and one-way between its layers.

Every third-party module that server/, engine/ or kernels/ imports, at load or lazily, belongs to
a dependency declared in pyproject.toml, or is an optional accelerator named here with the reason
it may be missing. And server -> engine -> kernels only through each layer's public interface."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[2]
PRODUCT = ("server", "engine", "kernels")
OPTIONAL = {
    "triton": "the GPU kernels; kernels/__init__.py imports them (kernels/gpu.py) only where triton is importable and a CUDA tensor is at hand",
}


# What the server may use of the engine: the async interface, the model's facts, configs and
# request types, and the tokenizer type. Never the scheduler, block manager, runner or kernels.
SERVER_MAY_IMPORT = {
    "detserve.engine": {"__version__"},
    "detserve.engine.async_engine": {"AsyncEngine", "EngineUnavailableError", "RequestFailedError"},
    "detserve.engine.config": {"EngineConfig", "option"},
    "detserve.engine.llm_engine": {"AdmittedRequest", "ModelInfo"},
    "detserve.engine.request": {"FinishReason", "ParamError", "RequestOutput", "SamplingParams", "TokenLogprob"},
    "detserve.engine.tokenizer": {"Tokenizer"},
    "detserve.engine.structured": {"KINDS", "GrammarError", "StructuredOutput"},
    "detserve.engine.workers": {"Rendezvous", "serve_as_worker"},  # a torchrun rank > 0 serves no HTTP
}


def _imports(package: str) -> list[tuple[Path, str, list[str]]]:
    """(file, module, names) of every absolute import in a product package; names [] for `import m`
    and for `from detserve import engine` (module `detserve.engine`)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(where, alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "detserve":
                found += [(where, f"detserve.{alias.name}", []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((where, node.module, [alias.name for alias in node.names]))
    return found


def _layer(module: str) -> str | None:
    """"server", "engine" or "kernels" for a module of that product layer, else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "detserve" and len(parts) > 1 and parts[1] in PRODUCT else None


def _imported_modules() -> dict[str, Path]:
    """Top-level module name -> one product file importing it."""
    found: dict[str, Path] = {}
    for package in PRODUCT:
        for path, module, _ in _imports(package):
            found.setdefault(module.split(".")[0], path)
    return found


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_product_is_a_declared_dependency():
    declared = {_normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
                for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared = []
    for module, where in _imported_modules().items():
        if module in sys.stdlib_module_names or module in ("detserve", "__future__") or module in OPTIONAL:
            continue
        owners = {_normalized(d) for d in distributions.get(module, [module])}
        if not owners & declared:
            undeclared.append(f"{module} (imported by {where}; from {sorted(owners)})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + ", ".join(undeclared)


def test_the_server_uses_only_the_engines_public_interface_and_never_the_kernels():
    strays = []
    for path, module, names in _imports("server"):
        layer = _layer(module)
        allowed = SERVER_MAY_IMPORT.get(module)
        if layer == "kernels" or (layer == "engine" and (allowed is None or not set(names) <= allowed)):
            strays.append(f"{path}: {module} {names}")
        if path.parts[1] == "bench" and layer in ("engine", "kernels"):
            strays.append(f"{path}: {module} (the bench clients speak HTTP only)")
    assert not strays, strays


def test_the_engine_reaches_the_kernels_through_their_facade_and_kernels_import_no_layer_above():
    strays = [f"{path}: {module}" for path, module, _ in _imports("engine")
              if _layer(module) == "kernels" and module != "detserve.kernels"]
    strays += [f"{path}: {module}" for path, module, _ in _imports("kernels") if _layer(module) in ("engine", "server")]
    assert not strays, strays


def test_the_product_imports_itself_under_the_detserve_namespace_only():
    """The installed names are detserve.*: a bare `import kernels` would find Hugging Face's package."""
    bare = [f"{path}: {module}" for package in PRODUCT for path, module, _ in _imports(package)
            if module.split(".")[0] in PRODUCT]
    assert not bare, bare


def test_the_product_does_not_import_the_developer_tools():
    importers = [str(where) for module, where in _imported_modules().items() if module == "bench"]
    assert not importers, f"bench/ is not installed, yet {importers} import it"


def test_the_top_level_name_kernels_is_hugging_faces_package_even_from_the_checkout_root() -> None:
    """The checkout's kernels/ is detserve.kernels; with the checkout's root on sys.path (pytest,
    `python -m` run there) it must not answer `import kernels`, which transformers does when
    Hugging Face's package is installed (it is, in the test extras)."""
    root = Path(__file__).resolve().parents[2]
    probe = ("import sys; sys.path.insert(0, ''); import detserve.engine, importlib.util; "
             "print(importlib.util.find_spec('kernels').origin)")
    origin = subprocess.run([sys.executable, "-c", probe], cwd=root, check=True, capture_output=True,
                            text=True).stdout.strip()
    assert "site-packages" in origin and not origin.startswith(str(root / "kernels"))
