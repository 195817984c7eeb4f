"""Depth-pruning methods beside ReplaceMe, one file each behind a registry (`base.py` says the contract).

ReplaceMe itself (LS, cosine, UIDL) stays in `replaceme_core/prune.py`, where a student finds it first; the files
here are the methods the paper compares against. Importing a module of this package registers its method;
`load_all()` imports every one.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Method, Outcome, data_defaults, get_method, parse_option, register, resolve_options

_PRIVATE = {"base", "common", "apply"}


def load_all() -> dict[str, Method]:
    """Import every method module of this package (each registers itself); the registry by name."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _PRIVATE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


__all__ = ["REGISTRY", "Method", "Outcome", "data_defaults", "get_method", "load_all", "parse_option", "register",
           "resolve_options"]
