"""Fisher merging (Matena & Raffel, 2022): a per-parameter precision-weighted average.

For one output tensor, with inputs ``theta_i``, diagonal Fishers ``F_i`` (same shape), weights
``w_i``, ``floor`` and optional Fisher norms ``n_i``::

    a_i   = w_i / n_i      if norms are given (normalize: true), else w_i
    theta = sum_i a_i (F_i + floor) theta_i / sum_i a_i (F_i + floor)               (no base)
    theta = base + sum_i a_i (F_i + floor) (theta_i - base) / sum_i a_i (F_i + floor)  (with base:
                                                        Fisher-weighted task arithmetic on deltas)

All element-wise; shapes ``[*]`` of the tensor. Because the precisions are normalised, the base
form equals the base-free one in exact arithmetic (``b + sum p_i (theta_i - b) / sum p_i =
sum p_i theta_i / sum p_i``); it is computed on deltas so that small task vectors in bf16/fp16
inputs keep their precision. ``n_i`` is the global L2 norm of model i's whole
Fisher (recorded at calibration time), so models whose losses have different scales count equally.

Fallback rule: at every element where ALL models' Fishers are exactly zero (no model's loss
touches that parameter, e.g. an unused head), and wherever the denominator is zero or not finite,
the result is the plain weighted average ``sum_i w_i theta_i / sum_i w_i`` (raw weights, no norms;
with a base this equals ``base + sum_i w_i delta_i / sum_i w_i``). With ``floor > 0`` elements
that some but not all models touch are handled by the formula (the untouched models count with
weight ``a_i * floor``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.errors import TensorMismatchError

__all__ = ["fisher_merge", "DEFAULT_FISHER_FLOOR"]

DEFAULT_FISHER_FLOOR = 1e-6


def fisher_merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: Optional[torch.Tensor],
    floor: float,
    norms: Optional[Sequence[float]],
) -> torch.Tensor:
    """Fisher-weighted average of ``tensors`` (see the module docstring for the maths and the
    zero-Fisher fallback). ``tensors[i]``, ``fishers[i]`` and ``base`` share one shape; the result
    has it, in ``tensors[0]``'s dtype (computed in float32, float64 when the inputs are float64).
    ``norms[i] <= 0`` or non-finite counts as 1 (a model with an all-zero Fisher)."""
    n = len(tensors)
    if n == 0:
        raise TensorMismatchError("fisher merge needs at least one input tensor")
    if len(fishers) != n or len(weights) != n or (norms is not None and len(norms) != n):
        raise TensorMismatchError(
            f"fisher merge got {n} tensors, {len(fishers)} Fishers, {len(weights)} weights"
            + (f", {len(norms)} norms" if norms is not None else "")
        )
    shape = tensors[0].shape
    for i, (t, f) in enumerate(zip(tensors, fishers)):
        if t.shape != shape or f.shape != shape:
            raise TensorMismatchError(
                f"fisher merge input {i}: tensor shape {tuple(t.shape)} / Fisher shape {tuple(f.shape)} "
                f"differ from {tuple(shape)}"
            )
    if base is not None and base.shape != shape:
        raise TensorMismatchError(f"fisher merge: base shape {tuple(base.shape)} differs from {tuple(shape)}")
    if not math.isfinite(floor) or floor < 0:
        raise ValueError(f"fisher_floor must be a finite number >= 0, got {floor}")
    weight_sum = float(sum(weights))
    if weight_sum == 0 or not math.isfinite(weight_sum):
        raise ValueError(f"fisher merge weights must have a finite non-zero sum, got {list(weights)}")

    out_dtype = tensors[0].dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    scales = []
    for i, w in enumerate(weights):
        norm = 1.0 if norms is None else float(norms[i])
        if not math.isfinite(norm) or norm <= 0:
            norm = 1.0
        scales.append(float(w) / norm)

    base_w = base.to(work) if base is not None else None
    numerator = torch.zeros(shape, dtype=work, device=tensors[0].device)
    denominator = torch.zeros(shape, dtype=work, device=tensors[0].device)
    plain = torch.zeros(shape, dtype=work, device=tensors[0].device)
    all_zero = torch.ones(shape, dtype=torch.bool, device=tensors[0].device)
    for t, f, w, a in zip(tensors, fishers, weights, scales):
        value = t.to(work)
        if base_w is not None:
            value = value - base_w
        fw = f.to(device=value.device, dtype=work)
        all_zero &= fw == 0
        precision = (fw + floor) * a
        numerator.addcmul_(precision, value)
        denominator.add_(precision)
        plain.add_(value, alpha=float(w))
        del value, fw, precision
    plain.div_(weight_sum)
    merged = numerator / denominator
    fallback = all_zero | (denominator == 0) | ~torch.isfinite(merged)
    merged = torch.where(fallback, plain, merged)
    if base_w is not None:
        merged = merged + base_w
    return merged.to(out_dtype)


# --------------------------------------------------------------------------- registry glue


def _fisher_fn(tensors, base, params, *, stats):
    """Registry adapter: ``stats[i]`` is ``(fisher tensor or None, fisher norm)`` for input ``i``;
    a missing Fisher (a tensor no loss touched, e.g. a buffer) counts as all-zero."""
    from mergekit_bico.errors import ConfigError

    weights = params["weight"]
    if sum(weights) == 0:
        raise ConfigError(f"fisher: the weights {list(weights)} sum to 0")
    fishers = [f if f is not None else torch.zeros_like(t) for (f, _), t in zip(stats, tensors)]
    norms = [n for _, n in stats] if params["normalize"] else None
    return fisher_merge(tensors, fishers, weights, base=base, floor=params["fisher_floor"], norms=norms)


def _register() -> None:
    from mergekit_bico.methods.registry import MergeMethod, ParamSpec, register

    def non_negative(v: float) -> Optional[str]:
        return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"

    def estimator(v: str) -> Optional[str]:
        return None if v in ("expected", "empirical") else "must be 'expected' or 'empirical'"

    def positive(v: int) -> Optional[str]:
        return None if v >= 1 else "must be >= 1"

    register(
        MergeMethod(
            name="fisher",
            summary="Fisher merging: per-parameter average weighted by each model's diagonal Fisher on its calibration data",
            base="optional",
            params=(
                ParamSpec("weight", float, "model", default=1.0, check=non_negative,
                          doc="model weight (>= 0: it scales a precision, which cannot be negative)"),
                ParamSpec("fisher_floor", float, "global", default=DEFAULT_FISHER_FLOOR, check=non_negative,
                          doc="added to every Fisher entry"),
                ParamSpec("normalize", bool, "global", default=False,
                          doc="divide each model's weight by the global L2 norm of its Fisher"),
                ParamSpec("fisher_estimator", str, "global", default="expected", check=estimator,
                          doc="expected (true Fisher, sampled for LMs) or empirical (at the data's labels)"),
                ParamSpec("lm_samples", int, "global", default=1, check=positive,
                          doc="sampled sequences per example for the expected Fisher of a causal LM"),
            ),
            uses_rng=False,
            fn=_fisher_fn,
            check_params=lambda p: f"the weights {list(p['weight'])} sum to 0" if sum(p["weight"]) == 0 else None,
            needs_stats=True,
            doc=__doc__ or "",
        )
    )


_register()
