"""``linear`` and ``task_arithmetic`` in numpy, bit for bit as their torch versions compute them.

These two methods are elementwise: every output element depends only on the same element of the
inputs, through a fixed sequence of IEEE additions, subtractions, multiplications and divisions,
which numpy and torch both round correctly. Run in numpy, a merge that needs nothing else from
torch never imports it (about 2 s on a 2-core machine, more than the rest of a 150M-parameter
merge); the executor picks this path per output tensor (see ``executor._lean_job``) and writes
the same bytes the torch path writes (tests/test_elementwise_np.py compares them bit for bit).

Representation: a tensor of computation dtype ``float64`` is a float64 array; of ``float32``,
``bfloat16`` or ``float16`` a float32 array holding values of that dtype. For the two 16-bit
dtypes every operation is computed in float32 and rounded to the dtype (round to nearest even),
which is what torch's CPU kernels do; a sum over inputs accumulates in float32 and rounds once,
as torch's ``sum`` does. Sums over inputs and sums of weights run in input order, here and in the
torch versions (:func:`~mergekit_bico.methods.task_arithmetic.sum_in_order`, ``weight_sum``):
torch's own ``sum`` changes its order with the size and the CPU's vector width.

NaN results are NaN in both paths; their bit patterns (sign, payload) may differ.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "STORAGE", "work_dtype", "to_work", "from_work", "round_to",
    "task_arithmetic", "linear", "has_nonfinite",
]

#: numpy dtype of the stored elements (bfloat16 as its uint16 bit patterns)
STORAGE = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
           "bfloat16": np.dtype("<u2")}


def work_dtype(dtype: str) -> np.dtype:
    """The array dtype that carries values of computation dtype ``dtype``."""
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


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


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (a work array) rounded to the values of ``dtype``, in place where possible."""
    if dtype == "bfloat16":
        return _bf16_to_f32(_f32_to_bf16(x))
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    return x


def to_work(stored: np.ndarray, stored_dtype: str, dtype: str) -> np.ndarray:
    """Stored elements of ``stored_dtype`` -> a work array of computation dtype ``dtype``, as
    torch's ``.to(dtype)`` converts them (exact, or rounded to nearest even)."""
    if stored_dtype == "bfloat16":
        x = _bf16_to_f32(stored)
    elif stored_dtype == "float16":
        x = stored.astype(np.float32)
    else:
        x = stored
    with np.errstate(over="ignore"):
        x = x.astype(work_dtype(dtype), copy=False)
    return round_to(x, dtype) if stored_dtype != dtype else x


def from_work(x: np.ndarray, out_dtype: str) -> np.ndarray:
    """A work array -> stored elements of ``out_dtype`` (round to nearest even)."""
    if out_dtype == "bfloat16":
        return _f32_to_bf16(x.astype(np.float32, copy=False))
    with np.errstate(over="ignore"):
        return x.astype(STORAGE[out_dtype], copy=False)


def _weight_sum(weights: np.ndarray, dtype: str) -> np.floating:
    total = np.zeros((), work_dtype(dtype))
    for w in weights:
        total = total + w
    return round_to(np.asarray(total).reshape(1), dtype)[0]


def task_arithmetic(
    tensors: Sequence[np.ndarray], base: np.ndarray, weight: Sequence[float], *, dtype: str,
    normalize: bool = False, lambda_: float = 1.0,
) -> np.ndarray:
    """``base + lambda * sum_i w_i (t_i - base) [/ sum_i w_i]``, every step rounded to ``dtype``
    as :func:`~mergekit_bico.methods.task_arithmetic.generalized_task_arithmetic` (no
    sparsification, no consensus) rounds it. Work arrays in, a work array out."""
    if not tensors:
        return base
    work = work_dtype(dtype)
    weights = round_to(np.array(list(weight), dtype=work), dtype)
    acc = None
    for tensor, w in zip(tensors, weights, strict=True):
        delta = round_to(tensor - base, dtype)
        delta = round_to(np.multiply(delta, w, out=delta), dtype)
        if acc is None:
            acc = delta
        else:
            acc += delta
    mixed = round_to(acc, dtype)
    if normalize:
        divisor = _weight_sum(weights, dtype)
        if abs(divisor) < 1e-8:
            divisor = work.type(1)
        mixed = round_to(np.divide(mixed, divisor, out=mixed), dtype)
    if lambda_ != 1:
        mixed = round_to(np.multiply(mixed, work.type(lambda_), out=mixed), dtype)
    return round_to(np.add(mixed, base, out=mixed), dtype)


def linear(tensors: Sequence[np.ndarray], weight: Sequence[float], *, dtype: str, normalize: bool = True) -> np.ndarray:
    """``sum_i w_i t_i [/ sum_i w_i]`` accumulated in float32 (float64 for float64) and rounded
    to ``dtype`` once, as :func:`~mergekit_bico.methods.linear.linear_merge`. The caller checks
    that the weights do not sum to 0 with ``normalize`` (the planner does)."""
    acc_dtype = "float64" if dtype == "float64" else "float32"
    work = work_dtype(acc_dtype)
    weights = np.array(list(weight), dtype=work)
    result = np.zeros(tensors[0].shape, dtype=work)
    for tensor, w in zip(tensors, weights, strict=True):
        result += tensor.astype(work, copy=False) * w
    if normalize:
        result /= _weight_sum(weights, acc_dtype)
    return round_to(result, dtype)


def has_nonfinite(x: np.ndarray) -> bool:
    """Whether a float array holds NaN or +-Inf: one summing pass; the exact check only when the
    sum is not finite (an overflowing sum can cause that too)."""
    if x.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(x.sum(dtype=np.float64 if x.dtype == np.float64 else np.float32)):
            return False
    return not bool(np.isfinite(x).all())
