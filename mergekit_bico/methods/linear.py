"""``linear``: weighted average of the inputs (mergekit 0.1.5 semantics).

    result = sum_i w_i * M_i            (accumulated in float32; float64 inputs in float64)
    if normalize: result /= sum_i w_i   (weights summed in the same precision)

The result is cast back to the computation dtype. ``linear`` has no base role:
mergekit nevertheless appends ``base_model`` as one more input (with the
global/slice ``weight``) when it is given but not listed under ``models:`` --
that is the planner's job. With ``normalize`` and weights summing to exactly
zero mergekit divides by zero (inf/NaN output); mergekit-bico raises ConfigError.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.errors import ConfigError
from mergekit_bico.methods.registry import MergeMethod, ParamSpec, check_finite, register

__all__ = ["linear_merge"]


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weight: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(list(weight), dtype=dtype, device=first.device)
    if normalize:
        total = weights.sum()
        if float(total) == 0.0:
            raise ConfigError(
                "linear: weights sum to 0 with normalize: true (division by zero);"
                " set normalize: false or change the weights"
            )
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weights.unbind(0), strict=True):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(total)
    return result.to(first.dtype)


def _fn(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, params: Mapping[str, Any]
) -> torch.Tensor:
    return linear_merge(tensors, params["weight"], params["normalize"])


def _check_params(params: Mapping[str, Any]) -> str | None:
    """Caught when planning, before any tensor is merged (``linear_merge`` checks again in its dtype)."""
    if params["normalize"] and sum(params["weight"]) == 0:
        return (f"weights {list(params['weight'])} sum to 0 with normalize: true (division by zero);"
                " set normalize: false or change the weights")
    return None


register(
    MergeMethod(
        name="linear",
        summary="weighted average of the models (arXiv:2203.05482)",
        base="none",
        params=(
            ParamSpec("weight", float, "model", required=True, check=check_finite,
                      doc="weight of this model (may be negative)"),
            ParamSpec("normalize", bool, "global", default=True,
                      doc="divide by the sum of the weights"),
        ),
        uses_rng=False,
        fn=_fn,
        check_params=_check_params,
        doc=__doc__ or "",
    )
)
