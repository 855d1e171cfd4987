"""``merge_method: bico``: transferred task vectors added to the target base.

Each model entry is a fine-tune of an *old* base (``source_base``). The transfer layer
(:mod:`mergekit_bico.transfer`) has already carried its delta into the target's coordinates
(``R_out^T (A' - A) R_in``), so the merge itself is task arithmetic on the target base B::

    result = B + lambda * sum_i w_i * delta_i        # delta_i = tensors[i] - B

``weight`` scales each transferred delta (default 1). The same transfer is available under every
other method through a per-model ``transfer:`` block.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.methods.registry import MergeMethod, ParamSpec, check_finite, register


def bico_sum(tensors: Sequence[torch.Tensor], base: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """``base + lambda * sum_i weight_i * (tensors[i] - base)``; all tensors share one shape."""
    out = torch.zeros_like(base, dtype=torch.float32)
    for t, w in zip(tensors, params["weight"]):
        out.add_(t.float() - base.float(), alpha=float(w))
    out.mul_(float(params["lambda"]))
    return (base.float() + out).to(base.dtype)


register(
    MergeMethod(
        name="bico",
        summary="BiCo transfer: add fine-tunes of an old base (source_base) to a new base_model, training-free",
        base="required",
        params=(
            ParamSpec("weight", float, "model", default=1.0, check=check_finite, doc="scale of the transferred delta"),
            ParamSpec("lambda", float, "global", default=1.0, check=check_finite, doc="scale of the summed deltas"),
        ),
        uses_rng=False,
        fn=bico_sum,
        doc=__doc__ or "",
    )
)
