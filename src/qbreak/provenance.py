"""Provenance: a hash of the qbreak modules a rule's logic lives in, and installed versions.

Snakemake reruns a job when its params change but cannot see inside an imported package, so rules
put `source_hash(...)` of their modules (or single functions) in `params`; editing one stage's code
reruns that stage.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_hash(*modules: str) -> str:
    """SHA-256 (16 hex digits) of the named qbreak modules' source, e.g. source_hash("nll", "passes"),
    and of every qbreak module they import, directly or not.

    "module:function" hashes one top-level function (or class) of a module, and the modules that
    function imports, so a module of many small entry points (jobs) can be shared by stages without
    one stage's edit rerunning the rest. Following the imports means a stage's list cannot miss a
    module its code uses (a new helper module reruns the stages that import it).
    """
    digest = hashlib.sha256()
    for name in sorted(_with_imports(set(modules))):
        digest.update(name.encode() + b"\0" + _source(name).encode())
    return digest.hexdigest()[:16]


def _source(name: str) -> str:
    """The source of a module, or of one of its top-level definitions for "module:function"."""
    module, _, function = name.partition(":")
    source = _module_path(module).read_text()
    return _definition_source(source, function, module) if function else source


def _with_imports(names: set[str]) -> set[str]:
    """`names` and every qbreak module imported, anywhere in their source, by them or by a module
    they import."""
    done: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in done:
            done.add(name)
            todo.extend(_imported_modules(_source(name)))
    return done


def _imported_modules(source: str) -> set[str]:
    """The qbreak modules (names relative to the package) that `source` imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from qbreak.quantize import rtn` imports the module quantize.rtn
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    names = {name.removeprefix("qbreak.") for name in found if name.startswith("qbreak.")}
    return {name for name in names if _module_exists(name)}


def _module_exists(module: str) -> bool:
    try:
        _module_path(module)
    except FileNotFoundError:
        return False
    return True


def _module_path(module: str) -> Path:
    path = PACKAGE_DIR / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE_DIR / module.replace(".", "/") / "__init__.py"
    if not path.is_file():
        raise FileNotFoundError(f"qbreak module '{module}' not found under {PACKAGE_DIR}")
    return path


def _definition_source(source: str, name: str, module: str) -> str:
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return ast.get_source_segment(source, node) or ""
    raise FileNotFoundError(f"qbreak module '{module}' defines no top-level '{name}'")


def package_version(distribution: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
