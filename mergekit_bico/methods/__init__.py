"""Merge methods: pure tensor functions + parameter specs + a registry.

Importing this package fills :data:`REGISTRY` with the built-in methods
(linear, passthrough, the task-arithmetic family) and, when present, the
optional modules ``fisher`` and ``bico``.
"""

from __future__ import annotations

import importlib

from mergekit_bico.methods import linear, passthrough, task_arithmetic  # noqa: F401  (register)
from mergekit_bico.methods.registry import (
    REGISTRY,
    MergeMethod,
    ParamSpec,
    get_method,
    list_methods,
    make_generator,
    register,
)

__all__ = [
    "REGISTRY",
    "MergeMethod",
    "ParamSpec",
    "get_method",
    "list_methods",
    "make_generator",
    "register",
]

for _optional in ("fisher", "bico"):
    _module = f"{__name__}.{_optional}"
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:
        # Skip only when that module itself is absent; a missing dependency
        # *inside* it is a real error.
        if exc.name != _module:
            raise
del _optional, _module
