"""Plug-in discovery shared by the family, eval and analysis registries."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_plugins(package: ModuleType, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Import every public module of ``package`` (each registers itself on import); modules
    whose name starts with ``_`` or is in ``skip`` hold shared parts and are left alone."""
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_") and mod.name not in skip:
            importlib.import_module(f"{package.__name__}.{mod.name}")
