"""``task_arithmetic`` in numpy, bit for bit as its torch version (and mergekit 0.1.5) computes it.

Task arithmetic is elementwise: every output element depends only on the same element of the
inputs, through a fixed sequence of IEEE additions, subtractions, multiplications and divisions,
which numpy and torch both round correctly. Run in numpy, a merge that needs nothing else from
torch never imports it (1.4 to 2.4 s on a 2-core machine, more than the rest of a 150M-parameter
merge); the executor picks this path per output tensor (see ``executor._lean_job``) and writes
the same bytes the torch path writes (tests/test_elementwise_np.py compares them bit for bit).

The computation is float32 or float64 (the config's ``dtype``, else the inputs' promotion); inputs
of any of the four floating dtypes are converted to it exactly as torch's ``.to()`` converts them,
and the result is rounded to the output dtype to nearest even. 16-bit *arithmetic* stays in
torch: emulating it here means rounding after every operation, and the first version of this
module (commit a35e016), which did, merged the 608M-parameter benchmark models in bfloat16 in
6.8-7.4 s against torch's 3.7-4.8 s (README, "Merge methods").

The sum over the inputs' deltas is the one step whose order torch chooses: ``deltas.sum(dim=0)``
(mergekit's call, and ours) adds up to four inputs in order (the kernel tests check it for 1-4),
but not five or more (tried on this machine in float32 and float64: some elements differed from
the in-order sum by an ulp). So this path takes at most :data:`MAX_INPUTS` inputs; more run in
torch. ``linear`` is not here at all: mergekit's ``addcmul_`` fuses each multiply-add into one
rounding on the CPU's vector units (and not on its scalar tail), which numpy cannot reproduce.

NaN results are NaN in both paths; their bit patterns (sign, payload) may differ.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["STORAGE", "COMPUTE", "MAX_INPUTS", "to_work", "from_work", "task_arithmetic", "has_nonfinite"]

#: numpy dtype of the stored elements (bfloat16 as its uint16 bit patterns)
STORAGE = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
           "bfloat16": np.dtype("<u2")}
#: the computation dtypes of this path
COMPUTE = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
#: the most inputs (besides the base) whose delta sum torch adds in order (see the module docstring)
MAX_INPUTS = 4


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns, to nearest even (NaN stays NaN)."""
    u = x.view(np.uint32)
    bits = ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def to_work(stored: np.ndarray, stored_dtype: str, dtype: str) -> np.ndarray:
    """Stored elements of ``stored_dtype`` -> an array of computation dtype ``dtype`` (float32 or
    float64), as torch's ``.to(dtype)`` converts them (exact, or float64 -> float32 rounded to
    nearest even)."""
    if stored_dtype == "bfloat16":
        x = _bf16_to_f32(stored)
    elif stored_dtype == "float16":
        x = stored.astype(np.float32)
    else:
        x = stored
    return x.astype(COMPUTE[dtype], copy=False)


def from_work(x: np.ndarray, out_dtype: str) -> np.ndarray:
    """A float32 / float64 array -> stored elements of ``out_dtype`` (round to nearest even)."""
    if out_dtype == "bfloat16":
        return _f32_to_bf16(x.astype(np.float32, copy=False))
    with np.errstate(over="ignore"):
        return x.astype(STORAGE[out_dtype], copy=False)


def _weight_sum(weights: np.ndarray) -> np.floating:
    total = weights.dtype.type(0)
    for w in weights:
        total = total + w
    return total


def task_arithmetic(
    tensors: Sequence[np.ndarray], base: np.ndarray, weight: Sequence[float], *, dtype: str,
    normalize: bool = False, lambda_: float = 1.0,
) -> np.ndarray:
    """``base + lambda * sum_i w_i (t_i - base) [/ sum_i w_i]`` in ``dtype`` (float32 / float64),
    the operations of :func:`~mergekit_bico.methods.task_arithmetic.generalized_task_arithmetic`
    (no sparsification, no consensus) in its order, for at most :data:`MAX_INPUTS` inputs.
    Arrays of ``dtype`` in, one out."""
    if not tensors:
        return base
    work = COMPUTE[dtype]
    weights = np.array(list(weight), dtype=work)
    acc = None
    with np.errstate(all="ignore"):     # overflow gives inf as in torch; --nan-policy judges it
        for tensor, w in zip(tensors, weights, strict=True):
            delta = np.subtract(tensor, base)
            delta *= w
            if acc is None:
                acc = delta
            else:
                acc += delta
        if normalize:
            divisor = _weight_sum(weights)
            if abs(divisor) < 1e-8:
                divisor = work.type(1)
            acc /= divisor
        if lambda_ != 1:
            acc *= work.type(lambda_)
        acc += base
    return acc


def has_nonfinite(x: np.ndarray) -> bool:
    """Whether a float array holds NaN or +-Inf: one summing pass; the exact check only when the
    sum is not finite (an overflowing sum can cause that too)."""
    if x.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(x.sum(dtype=np.float64 if x.dtype == np.float64 else np.float32)):
            return False
    return not bool(np.isfinite(x).all())
