"""Tensor dtypes by name, without importing torch.

Planning, header parsing, the output layout and the numpy kernel of task_arithmetic
(:mod:`mergekit_bico.methods.elementwise_np`) work on dtype *names* (``"bfloat16"``) and the
safetensors tags of the headers (``"BF16"``); torch dtypes are made from them only where torch
runs (:func:`torch_dtype`). A merge that needs no torch then never imports it (``import torch``
alone takes 1.4 to 2.4 s on a 2-core machine).
"""

from __future__ import annotations

from typing import Any

__all__ = ["NUMPY_METHODS", "TAGS", "TAG_OF", "FLOATING", "itemsize", "torch_dtype", "name_of", "promote", "torch"]

#: merge methods whose jobs may run in numpy, without torch (``executor._lean_job`` decides per job)
NUMPY_METHODS = frozenset({"task_arithmetic"})

#: safetensors dtype tag -> (dtype name, as torch spells it; bytes per element)
TAGS: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}
#: dtype name -> safetensors tag
TAG_OF: dict[str, str] = {name: tag for tag, (name, _) in TAGS.items()}
_SIZE: dict[str, int] = {name: size for name, size in TAGS.values()}
#: floating dtypes (``torch.dtype.is_floating_point``); float8 types count, as in torch
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"} | {n for n in TAG_OF if n.startswith("float8")})
# the four merge (computation) dtypes, narrowest first within their family
_RANK = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def itemsize(name: str) -> int:
    """Bytes per element of dtype ``name``."""
    return _SIZE[name]


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` called ``name`` (imports torch). KeyError for names torch lacks."""
    import torch as _torch

    value = getattr(_torch, name, None)
    if not isinstance(value, _torch.dtype):
        raise KeyError(name)
    return value


def name_of(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; a name is returned as it is."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def promote(a: str, b: str) -> str:
    """``torch.promote_types`` for the merge dtypes: the wider one; float16 with bfloat16 -> float32."""
    if a == b:
        return a
    if a not in _RANK or b not in _RANK:
        return name_of(torch_dtype_promote(a, b))
    if _RANK[a] == _RANK[b]:  # float16 and bfloat16
        return "float32"
    return a if _RANK[a] > _RANK[b] else b


def torch_dtype_promote(a: str, b: str) -> Any:
    import torch as _torch

    return _torch.promote_types(torch_dtype(a), torch_dtype(b))


class _LazyTorch:
    """``torch``, imported on the first attribute access (then each attribute is kept on this
    object, so later accesses cost a plain attribute read). Modules on the merge path use
    ``from mergekit_bico.dtypes import torch``: importing them costs nothing until torch is used."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        import torch as _torch

        value = getattr(_torch, attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()
