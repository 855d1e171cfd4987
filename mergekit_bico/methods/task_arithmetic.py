"""The generalized task-arithmetic family (mergekit 0.1.5 semantics).

``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear``: one algorithm with two
switches (sparsification of each delta, sign consensus).

For one output tensor with base ``B`` and inputs ``M_1..M_n`` (base excluded),
all in the computation dtype (no internal upcast, as mergekit)::

    d_i   = sparsify(M_i - B)                      # per input: density, gamma, epsilon, rescale
    d_i  *= w_i                                    # weight, cast to the computation dtype
    # with consensus (the *ties methods, della):
    s     = +1 where sum_i d_i >= 0 else -1        # majority sign, "sum" method
    m_i   = sign(d_i) == s                         # zero deltas never agree
    D     = sum_i d_i * m_i ;  div = sum_i w_i * m_i ;  div[div == 0] = 1
    # without consensus:
    D     = sum_i d_i       ;  div = sum_i w_i     ;  div = 1 if |div| < 1e-8
    if normalize: D /= div
    if lambda != 1: D *= lambda
    result = B + D

With no non-base input the base is returned.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.methods.registry import (
    MergeMethod,
    ParamSpec,
    check_density,
    check_finite,
    register,
)
from mergekit_bico.methods.sparsify import TIE_BREAKS, coerce_rescale, sparsify

__all__ = ["generalized_task_arithmetic", "sign_consensus_mask", "GTA_METHODS"]


def sign_consensus_mask(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Bool mask (same shape as ``deltas``, inputs stacked on dim 0) of entries
    whose sign agrees with the elected sign.

    ``"sum"`` (TIES paper): the sign of the summed weighted deltas, ``>= 0``
    electing +1. ``"count"``: the sign held by more inputs, ties electing +1.
    Zero deltas never agree; NaN deltas never agree (as ``sign(NaN) == +-1``
    is false in mergekit).
    """
    if method == "sum":
        positive = deltas.sum(dim=0) >= 0
    elif method == "count":
        sign = deltas.sign().to(torch.int8)
        positive = sign.sum(dim=0, dtype=torch.int32) >= 0
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    # sign(d) == +1 where +1 is elected, sign(d) == -1 where -1 is: no sign tensor needed
    return torch.where(positive, deltas > 0, deltas < 0)


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: str = "none",
    lambda_: float = 1.0,
    generator: torch.Generator | None = None,
    thresholds: Sequence[Any] | None = None,
    tie_break: str = "index",
) -> torch.Tensor:
    """Merge task vectors ``tensors[i] - base`` (see the module docstring).

    ``thresholds`` (one :class:`~mergekit_bico.methods.sparsify.MagnitudeThreshold`
    or None per input) replaces magnitude sparsification when merging a tensor
    slice by slice.

    Same operations, in the same order and dtype, as mergekit 0.1.5 (so the same
    rounding), but written into preallocated buffers: one ``(n, *shape)`` delta
    buffer, no per-input temporaries.
    """
    if not tensors:
        return base
    n = len(tensors)
    deltas = base.new_empty((n, *base.shape))
    for index, tensor in enumerate(tensors):
        delta = deltas[index]
        torch.sub(tensor, base, out=delta)
        if thresholds is not None:
            if thresholds[index] is not None:
                thresholds[index].apply(delta)
        elif sparsification is not None:
            kept = sparsify(
                delta,
                sparsification,
                density=density[index] if density is not None else 1.0,
                rescale=rescale,
                gamma=gamma[index] if gamma is not None else 0.01,
                epsilon=epsilon[index] if epsilon is not None else 0.15,
                generator=generator,
                inplace=True,
                tie_break=tie_break,
            )
            if kept is not delta:
                delta.copy_(kept)
            del kept
        del delta

    weights = torch.tensor(list(weight), dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape(n, *([1] * base.dim()))
    deltas.mul_(weights)

    if consensus is not None:
        mask = sign_consensus_mask(deltas, consensus)
        mixed = deltas.mul_(mask).sum(dim=0)
        # sum_i w_i * mask_i, accumulated in order (w_i * mask_i is exactly w_i or 0)
        divisor = torch.zeros_like(mixed)
        for index in range(n):
            divisor.add_(mask[index], alpha=float(weights[index].reshape(())))
        del mask
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas

    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    mixed.add_(base)  # == base + mixed (addition is commutative), without a new tensor
    return mixed if mixed.dtype == base.dtype else mixed.to(base.dtype)


def _make_fn(sparsification: str | None, consensus: str | None):
    def fn(
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor,
        params: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return generalized_task_arithmetic(
            tensors,
            base,
            weight=params["weight"],
            density=params.get("density"),
            gamma=params.get("gamma"),
            epsilon=params.get("epsilon"),
            sparsification=sparsification,
            consensus=consensus,
            normalize=params["normalize"],
            rescale=params["rescale"],
            lambda_=params["lambda"],
            generator=generator,
            tie_break=params.get("tie_break", "index"),
        )

    return fn


def _check_della(values: Mapping[str, Any]) -> str | None:
    density, epsilon = values["density"], values["epsilon"]
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return (
            f"epsilon {epsilon} with density {density} must keep density +/- epsilon"
            " inside (0, 1)"
        )
    return None


_RESCALE_DOC = (
    "true/'l1': rescale each sparsified delta to its original L1 norm (mergekit 0.1.5); "
    "'inverse_density': divide kept entries by their keep probability (DARE paper); "
    "false/'none': no rescale"
)


def _params(
    sparsification: str | None, default_normalize: bool, default_rescale: bool
) -> tuple[ParamSpec, ...]:
    params = [
        ParamSpec("weight", float, "model", required=True, check=check_finite,
                  doc="scale of this model's task vector (may be negative)"),
        ParamSpec("density", float, "model", default=1.0, check=check_density,
                  doc="fraction of each task vector's entries kept"
                  + ("" if sparsification else " (no effect for this method)")),
        ParamSpec("normalize", bool, "global", default=default_normalize,
                  doc="divide by the sum of the weights (of agreeing inputs, with sign"
                  " consensus); a zero sum is treated as 1"),
        ParamSpec("rescale", str, "global", default="l1" if default_rescale else "none",
                  coerce=coerce_rescale, doc=_RESCALE_DOC),
        ParamSpec("lambda", float, "global", default=1.0, check=check_finite,
                  doc="scale of the merged task vector"),
        ParamSpec("int8_mask", bool, "global", default=False,
                  doc="accepted for mergekit compatibility; masks are always int8/bool"),
    ]
    if sparsification in ("magnitude", "magnitude_outliers"):
        params.append(ParamSpec(
            "tie_break", str, "global", default="index",
            check=lambda v: None if v in TIE_BREAKS else f"must be one of {', '.join(TIE_BREAKS)}",
            doc="equal magnitudes at the top-k cut: 'index' keeps the lowest flat indices (O(n), streams); "
                "'sort' keeps those mergekit 0.1.5's torch.argsort keeps (bit-identical output, costs its sort)"))
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec(
            "gamma", float, "model", default=0.01,
            check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
            doc="fraction of largest-magnitude entries removed as outliers"))
    if sparsification == "della_magprune":
        params.append(ParamSpec(
            "epsilon", float, "model", default=0.15,
            check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
            doc="half-width of the keep-probability range around density"))
    return tuple(params)


#: name -> (sparsification, consensus, default normalize, default rescale, uses_rng, summary)
GTA_METHODS: dict[str, tuple[str | None, str | None, bool, bool, bool, str]] = {
    "task_arithmetic": (None, None, False, False, False,
                        "base + sum of weighted task vectors (arXiv:2212.04089)"),
    "ties": ("magnitude", "sum", True, False, False,
             "TIES: top-k magnitude pruning + sign election (arXiv:2306.01708)"),
    "dare_ties": ("random", "sum", False, True, True,
                  "DARE random pruning + TIES sign election (arXiv:2311.03099)"),
    "dare_linear": ("random", None, False, True, True,
                    "DARE random pruning + task arithmetic (arXiv:2311.03099)"),
    "breadcrumbs": ("magnitude_outliers", None, False, False, False,
                    "Model Breadcrumbs: drop small and outlier entries (arXiv:2312.06795)"),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False, False,
                         "Model Breadcrumbs + TIES sign election (arXiv:2312.06795)"),
    "della": ("della_magprune", "sum", True, True, True,
              "DELLA: magnitude-ranked random pruning + sign election (arXiv:2406.11617)"),
    "della_linear": ("della_magprune", None, False, True, True,
                     "DELLA pruning + task arithmetic (arXiv:2406.11617)"),
}

for _name, (_sp, _cons, _norm, _resc, _rng, _summary) in GTA_METHODS.items():
    register(
        MergeMethod(
            name=_name,
            summary=_summary,
            base="required",
            params=_params(_sp, _norm, _resc),
            uses_rng=_rng,
            fn=_make_fn(_sp, _cons),
            check_entry=_check_della if _sp == "della_magprune" else None,
            doc=__doc__ or "",
        )
    )
del _name, _sp, _cons, _norm, _resc, _rng, _summary
