"""``passthrough``: copy the single input tensor, optionally scaled (mergekit 0.1.5).

    result = M            (scale unset)
    result = M * scale    (in the computation dtype)

Exactly one input; as in mergekit, a ``base_model`` that is not listed is
appended as an input by the planner and then makes the merge fail.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.methods.registry import MergeMethod, ParamSpec, check_finite, register

__all__ = ["passthrough"]


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return tensor if scale is None else tensor * scale


def _fn(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, params: Mapping[str, Any]
) -> torch.Tensor:
    return passthrough(tensors[0], params["scale"][0])


register(
    MergeMethod(
        name="passthrough",
        summary="copy the single input model's tensors (optionally scaled)",
        base="none",
        params=(
            ParamSpec("scale", float, "model", default=None, check=check_finite,
                      doc="multiply the tensor by this factor (unset: copy as is)"),
        ),
        uses_rng=False,
        fn=_fn,
        max_inputs=1,
        doc=__doc__ or "",
    )
)
