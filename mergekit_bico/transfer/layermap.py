"""Which source block each target block takes its delta from.

``layer_map`` in the ``transfer:`` block:

* ``index`` (default): target block ``j`` of ``D_B`` takes source block
  ``round(j (D_A - 1) / (D_B - 1))`` (round half up, so the result never depends on Python's
  banker's rounding); ``D_B == 1`` takes block 0.
* ``similarity``: blocks are paired by linear CKA of what each block *adds* to the residual stream
  (block output minus block input) on the calibration tokens. Updates discriminate blocks far
  better than the hidden states themselves (adjacent hidden states are all alike), and CKA is
  invariant to orthogonal maps and isotropic scaling, so a rotated / widened model scores 1 on its
  true partner. A target block whose update is (numerically) zero (an inserted identity block)
  gets no source (``None``). The others are aligned monotonically (non-decreasing source index,
  repeats allowed when D_B > D_A) by dynamic programming maximising the summed CKA.
* an explicit list ``[0, 1, null, 2]``: one entry per target block; ``null`` = no source block
  (the delta is zero there).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from mergekit_bico.errors import TransferError

__all__ = ["index_layer_map", "explicit_layer_map", "similarity_layer_map", "centered_gram", "cka_matrix", "resolve_static"]

DEAD_BLOCK_RTOL = 1e-6


def index_layer_map(d_source: int, d_target: int) -> list[Optional[int]]:
    """``[floor(j (D_A-1)/(D_B-1) + 1/2) for j in range(D_B)]``."""
    if d_source <= 0:
        raise TransferError("the source model has no blocks to map from")
    if d_target <= 1:
        return [0] * d_target
    return [int(math.floor(j * (d_source - 1) / (d_target - 1) + 0.5)) for j in range(d_target)]


def explicit_layer_map(spec: Sequence[Optional[int]], d_source: int, d_target: int, *, model: str = "target") -> list[Optional[int]]:
    """Validate an explicit list: one entry per target block, each a source block index or None."""
    if len(spec) != d_target:
        raise TransferError(
            f"layer_map lists {len(spec)} entries but target '{model}' has {d_target} blocks (one entry per target block, null for none)"
        )
    out: list[Optional[int]] = []
    for j, s in enumerate(spec):
        if s is None:
            out.append(None)
            continue
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < d_source:
            raise TransferError(f"layer_map entry {j} is {s!r}; expected a source block index in [0, {d_source}) or null")
        out.append(int(s))
    return out


def resolve_static(rule: Union[str, Sequence[Optional[int]]], d_source: int, d_target: int, *, model: str = "target") -> Optional[list[Optional[int]]]:
    """The layer map for ``index`` or an explicit list; None for ``similarity`` (needs statistics)."""
    if isinstance(rule, str):
        if rule == "index":
            return index_layer_map(d_source, d_target)
        if rule == "similarity":
            return None
        raise TransferError(f"unknown layer_map rule '{rule}' (use index, similarity or a list)")
    return explicit_layer_map(list(rule), d_source, d_target, model=model)


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Normalised centred Gram matrix of rows ``x`` (n x d): ``K = X_c X_c^T / ||X_c X_c^T||_F``
    (zero matrix when ``x`` is constant). Linear CKA is the inner product of two of them."""
    x = x.to(torch.float64)
    xc = x - x.mean(dim=0, keepdim=True)
    k = xc @ xc.T
    norm = torch.linalg.norm(k)
    return k / norm if float(norm) > 0 else torch.zeros_like(k)


def cka_matrix(grams_source: Sequence[torch.Tensor], grams_target: Sequence[torch.Tensor]) -> torch.Tensor:
    """``S[i, j]`` = linear CKA of source block i and target block j (normalised Grams, same tokens)."""
    a = torch.stack([g.reshape(-1) for g in grams_source])
    b = torch.stack([g.reshape(-1) for g in grams_target])
    return a @ b.T


def similarity_layer_map(similarity: torch.Tensor, dead_target: Sequence[bool]) -> list[Optional[int]]:
    """Monotone (non-decreasing) assignment of source blocks to the live target blocks maximising
    the summed similarity; dead target blocks get None. ``similarity``: (D_A, D_B)."""
    d_a, d_b = similarity.shape
    live = [j for j in range(d_b) if not dead_target[j]]
    out: list[Optional[int]] = [None] * d_b
    if not live:
        return out
    s = similarity.to(torch.float64)
    neg = float("-inf")
    best = [[neg] * d_a for _ in live]
    back = [[0] * d_a for _ in live]
    for i in range(d_a):
        best[0][i] = float(s[i, live[0]])
    for t in range(1, len(live)):
        j = live[t]
        run_max, run_arg = neg, 0
        for i in range(d_a):
            if best[t - 1][i] > run_max:
                run_max, run_arg = best[t - 1][i], i
            best[t][i] = run_max + float(s[i, j])
            back[t][i] = run_arg
    i = max(range(d_a), key=lambda k: (best[-1][k], -k))
    for t in range(len(live) - 1, -1, -1):
        out[live[t]] = i
        i = back[t][i]
    return out
