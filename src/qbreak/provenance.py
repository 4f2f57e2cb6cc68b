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
    """SHA-256 (16 hex digits) of the named qbreak modules' source, e.g. source_hash("nll", "passes").

    "module:function" hashes one top-level function (or class) of a module, so a module of many
    small entry points (jobs) can be shared by stages without one stage's edit rerunning the rest.
    """
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        module, _, function = name.partition(":")
        source = _module_path(module).read_text()
        if function:
            source = _definition_source(source, function, module)
        digest.update(name.encode() + b"\0" + source.encode())
    return digest.hexdigest()[:16]


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
