"""Provenance: a hash of the qbreak modules a rule's logic lives in, and installed versions.

Snakemake reruns a job when its params change but cannot see inside an imported package, so rules
put `source_hash(...)` of their modules (or single functions) in `params`; editing one stage's code
reruns that stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_hash(*modules: str, leaves: frozenset[str] = frozenset()) -> str:
    """SHA-256 (16 hex digits) of the named qbreak modules' source, e.g. source_hash("nll", "passes"),
    and of every qbreak module they import, directly or not.

    "module:function" hashes one top-level function (or class) of a module, and the modules that
    function imports, so a module of many small entry points (jobs) can be shared by stages without
    one stage's edit rerunning the rest. Following the imports means a stage's list cannot miss a
    module its code uses (a new helper module reruns the stages that import it).

    A module in `leaves` is hashed but its imports are not followed: a registry that imports every
    implementation (`quantize`), where a stage runs one of them, named in `modules`.
    """
    digest = hashlib.sha256()
    for name in sorted(_with_imports(set(modules), leaves)):
        digest.update(name.encode() + b"\0" + _source(name).encode())
    return digest.hexdigest()[:16]


def _source(name: str) -> str:
    """The source of a module, or of one of its top-level definitions for "module:function"."""
    module, _, function = name.partition(":")
    source = _module_path(module).read_text()
    if not function:
        return source
    definition = _definitions(source).get(function)
    if definition is None:
        raise FileNotFoundError(f"qbreak module '{module}' defines no top-level '{function}'")
    return definition


def _with_imports(names: set[str], leaves: frozenset[str] = frozenset()) -> set[str]:
    """`names` and every qbreak module imported, anywhere in their source, by them or by a module
    they import (but not by a module in `leaves`)."""
    done: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in done:
            done.add(name)
            if name not in leaves:
                todo.extend(_imported_modules(_source(name), PACKAGE_DIR))
    return done


@functools.lru_cache(maxsize=256)
def _imported_modules(source: str, package_dir: Path) -> frozenset[str]:
    """The qbreak modules (names relative to the package in `package_dir`) that `source` imports
    anywhere.

    Cached by source text (as `_definitions`): the workflow hashes ~20 stages' lists when it
    starts, and parsing the same modules for each took ~100 ms per list."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from qbreak.quantize import rtn` imports the module quantize.rtn
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    names = {name.removeprefix("qbreak.") for name in found if name.startswith("qbreak.")}
    return frozenset(name for name in names if _module_exists(name, package_dir))


def _module_exists(module: str, package_dir: Path) -> bool:
    try:
        _module_path(module, package_dir)
    except FileNotFoundError:
        return False
    return True


def _module_path(module: str, package_dir: Path | None = None) -> Path:
    package_dir = PACKAGE_DIR if package_dir is None else package_dir
    path = package_dir / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = package_dir / module.replace(".", "/") / "__init__.py"
    if not path.is_file():
        raise FileNotFoundError(f"qbreak module '{module}' not found under {package_dir}")
    return path


@functools.lru_cache(maxsize=64)
def _definitions(source: str) -> dict[str, str]:
    """Name → source of each top-level function and class of a module's source (the first, if
    a name is defined twice)."""
    definitions: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            definitions.setdefault(node.name, ast.get_source_segment(source, node) or "")
    return definitions


def package_version(distribution: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
