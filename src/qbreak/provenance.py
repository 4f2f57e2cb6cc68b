"""Provenance: a hash of the qbreak modules a rule's logic lives in, and installed versions.

Snakemake reruns a job when its params change but cannot see inside an imported package, so rules
put `source_hash(...)` of their modules in `params`; editing one stage's code reruns that stage.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_hash(*modules: str) -> str:
    """SHA-256 (16 hex digits) of the named qbreak modules' source, e.g. source_hash("nll", "passes")."""
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        path = PACKAGE_DIR / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = PACKAGE_DIR / module.replace(".", "/") / "__init__.py"
        if not path.is_file():
            raise FileNotFoundError(f"qbreak module '{module}' not found under {PACKAGE_DIR}")
        digest.update(module.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def package_version(distribution: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
