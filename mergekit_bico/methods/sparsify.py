"""Sparsification of task vectors (deltas): magnitude top-k, breadcrumbs, DARE, DELLA.

Same semantics as mergekit 0.1.5's ``mergekit/sparsify.py`` (kept elements,
``density >= 1`` returns the input unchanged, the L1 rescale), implemented
independently and without sorting whole tensors.

Ranking by magnitude
--------------------
Elements are ranked by ``|x|`` converted to float32 (mergekit does the same on
CPU). Instead of ``argsort`` (O(n log n)) the k-th value is found by a two-pass
radix select on the float32 bit patterns (``torch.bincount`` over the upper and
lower 16 bits; for non-negative floats the bit pattern order is the value
order, NaN ranks above +inf as in ``torch.sort``). Elements strictly beyond the
threshold are kept, and the remaining slots go to the elements *equal* to the
threshold **with the lowest flat indices** -- exactly the set a *stable*
``torch.sort`` would pick. For distinct magnitudes this is the same set as
mergekit's ``argsort``; for tied magnitudes at the threshold mergekit's choice
is an artefact of torch's unstable sort (it differs between CPU and CUDA and
between torch versions), ours is deterministic. Tied *zeros* (unchanged
weights) never matter numerically.

Rescaling (parameter ``rescale`` of the task-arithmetic family)
----------------------------------------------------------------
* ``"none"`` (``false``): kept entries are left as they are.
* ``"l1"`` (``true``, mergekit 0.1.5's behaviour): the sparsified delta is
  multiplied by ``||delta||_1 / ||masked delta||_1`` so that each tensor's
  delta keeps its L1 norm (skipped when either norm is below 1e-7).
* ``"inverse_density"`` (the DARE paper): kept entries are divided by their
  keep probability -- ``density`` for DARE and magnitude pruning, the
  per-element probability ``p_i`` for DELLA. For large tensors this is close to
  the L1 rule in expectation, but not equal.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "RESCALE_MODES",
    "coerce_rescale",
    "kth_smallest_key",
    "select_largest",
    "select_smallest",
    "magnitude_keys",
    "magnitude",
    "magnitude_outliers",
    "bernoulli",
    "della_magprune",
    "sparsify",
]

RESCALE_MODES = ("none", "l1", "inverse_density")
_RESCALE_ALIASES = {
    "none": "none",
    "false": "none",
    "no": "none",
    "off": "none",
    "0": "none",
    "f": "none",
    "n": "none",
    "l1": "l1",
    "true": "l1",
    "yes": "l1",
    "on": "l1",
    "1": "l1",
    "t": "l1",
    "y": "l1",
    "inverse_density": "inverse_density",
}
_EPS = 1e-7


def coerce_rescale(value: Any) -> str:
    """Map a config value for ``rescale`` to one of RESCALE_MODES.

    ``true`` (mergekit's boolean) means ``"l1"``, ``false`` means ``"none"``.
    """
    if isinstance(value, bool):
        return "l1" if value else "none"
    if isinstance(value, (int, float)) and value in (0, 1):
        return "l1" if value else "none"
    if isinstance(value, str):
        mode = _RESCALE_ALIASES.get(value.strip().lower())
        if mode is not None:
            return mode
    raise ValueError("must be true/false or one of 'none', 'l1', 'inverse_density'")


# ------------------------------------------------------------------ rank selection


def magnitude_keys(tensor: torch.Tensor) -> torch.Tensor:
    """Flat int32 sort keys whose order is the order of ``|tensor|`` in float32."""
    w = tensor.detach().reshape(-1)
    if w.dtype != torch.float32:
        w = w.float()
    # Clearing the sign bit of the float32 bit pattern is abs() (NaN included), in one pass.
    return w.view(torch.int32) & 0x7FFFFFFF


def _kth_smallest(keys: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(key, number of keys < key, number of keys <= key) for the k-th smallest key."""
    n = keys.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} elements")
    high = keys >> 16
    counts = torch.bincount(high, minlength=1 << 15).cumsum(0)
    digit = int(torch.searchsorted(counts, torch.tensor(k, device=counts.device)))
    below = int(counts[digit - 1]) if digit > 0 else 0
    low = torch.masked_select(keys, high == digit) & 0xFFFF
    del high
    counts = torch.bincount(low, minlength=1 << 16).cumsum(0)
    low_digit = int(
        torch.searchsorted(counts, torch.tensor(k - below, device=counts.device))
    )
    less = below + (int(counts[low_digit - 1]) if low_digit > 0 else 0)
    return (digit << 16) | low_digit, less, below + int(counts[low_digit])


def kth_smallest_key(keys: torch.Tensor, k: int) -> int:
    """The k-th smallest (1-based) of non-negative int32 ``keys``: radix select.

    Two counting passes over 16-bit digits; O(n), no sort.
    """
    return _kth_smallest(keys, k)[0]


def _take_ties(mask: torch.Tensor, keys: torch.Tensor, key: int, missing: int) -> torch.Tensor:
    """Add the ``missing`` lowest-index elements equal to ``key`` to ``mask``."""
    ties = torch.nonzero(keys == key).reshape(-1)[:missing]
    mask[ties] = True
    return mask


def select_largest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest keys; ties broken towards lower indices.

    Same set as ``torch.sort(keys, descending=True, stable=True).indices[:k]``.
    """
    n = keys.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    key, _less, less_eq = _kth_smallest(keys, n - k + 1)
    missing = k - (n - less_eq)  # slots left for elements equal to key (>= 1)
    if missing == less_eq - _less:  # every tied element fits: no tie-breaking
        return keys >= key
    return _take_ties(keys > key, keys, key, missing)


def select_smallest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest keys; ties broken towards lower indices.

    Same set as ``torch.sort(keys, stable=True).indices[:k]``.
    """
    n = keys.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    key, less, less_eq = _kth_smallest(keys, k)
    missing = k - less
    if missing == less_eq - less:
        return keys <= key
    return _take_ties(keys < key, keys, key, missing)


class MagnitudeThreshold:
    """Top-k magnitude pruning of a tensor processed in consecutive flat slices.

    Built from the whole tensor's key histograms (:meth:`from_histograms`), then
    :meth:`apply` is called on the slices in order; keeps exactly the set
    :func:`magnitude` keeps for the whole tensor (ties at the threshold go to
    the lowest flat indices).
    """

    __slots__ = ("key", "ties_left", "all_ties")

    def __init__(self, key: int, ties_left: int, all_ties: bool) -> None:
        self.key, self.ties_left, self.all_ties = key, ties_left, all_ties

    @staticmethod
    def high_histogram(keys: torch.Tensor) -> torch.Tensor:
        return torch.bincount(keys >> 16, minlength=1 << 15)

    @staticmethod
    def pick_digit(high_hist: torch.Tensor, numel: int, k: int) -> tuple[int, int]:
        """(high digit of the (numel-k+1)-th smallest key, number of keys below that digit)."""
        target = numel - k + 1
        counts = high_hist.cumsum(0)
        digit = int(torch.searchsorted(counts, torch.tensor(target)))
        return digit, int(counts[digit - 1]) if digit > 0 else 0

    @staticmethod
    def low_histogram(keys: torch.Tensor, digit: int) -> torch.Tensor:
        low = torch.masked_select(keys, (keys >> 16) == digit) & 0xFFFF
        return torch.bincount(low, minlength=1 << 16)

    @classmethod
    def from_histograms(cls, low_hist: torch.Tensor, digit: int, below: int, numel: int, k: int) -> "MagnitudeThreshold":
        target = numel - k + 1
        counts = low_hist.cumsum(0)
        low_digit = int(torch.searchsorted(counts, torch.tensor(target - below)))
        less = below + (int(counts[low_digit - 1]) if low_digit > 0 else 0)
        less_eq = below + int(counts[low_digit])
        missing = k - (numel - less_eq)
        return cls((digit << 16) | low_digit, missing, missing == less_eq - less)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the dropped entries of this slice of the delta, in place."""
        keys = magnitude_keys(delta)
        if self.all_ties:
            mask = keys >= self.key
        else:
            mask = keys > self.key
            if self.ties_left > 0:
                ties = torch.nonzero(keys == self.key).reshape(-1)[: self.ties_left]
                mask[ties] = True
                self.ties_left -= ties.numel()
        return delta.mul_(mask.reshape(delta.shape))


# ------------------------------------------------------------------------- rescale


def _apply_mask(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    rescale: str,
    keep_prob: float | torch.Tensor,
) -> torch.Tensor:
    masked = tensor * mask
    if rescale == "none":
        return masked
    if rescale == "inverse_density":
        return masked / keep_prob
    if rescale == "l1":
        before = tensor.abs().sum()
        after = masked.abs().sum()
        if before < _EPS or after < _EPS:
            return masked
        return masked * (before / after)
    raise ValueError(f"unknown rescale mode {rescale!r}")


def _random_work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # As mergekit: on CPU everything but bfloat16 is drawn/rescaled in float32.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def _uniform(
    shape: torch.Size, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """float32 U[0, 1) draws from ``generator``; drawn on the generator's device
    and moved, so results depend only on the generator's seed."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float32)
    draws = torch.rand(shape, generator=generator, device=generator.device,
                       dtype=torch.float32)
    return draws.to(device)


# ----------------------------------------------------------------------- sparsifiers


def magnitude(
    tensor: torch.Tensor, density: float, rescale: str = "none", inplace: bool = False
) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` largest-magnitude entries (TIES).

    ``inplace`` (with ``rescale="none"``) zeroes the dropped entries of ``tensor``
    itself, which is then returned.
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return tensor.zero_() if inplace else torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = select_largest(magnitude_keys(tensor), k).reshape(tensor.shape)
    if inplace and rescale == "none":
        return tensor.mul_(mask)  # x * 1 / x * 0, as mergekit's float mask
    return _apply_mask(tensor, mask.to(tensor.dtype), rescale, density)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, rescale: str = "none", gamma: float = 0.01
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``int(gamma*n)`` largest-magnitude entries and
    the smallest ones, keeping ``int(density*n)`` entries (outlier removal is
    reduced when needed to keep that many)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keys = magnitude_keys(tensor)
    mask = select_smallest(keys, n_bot + target) & ~select_smallest(keys, n_bot)
    return _apply_mask(tensor, mask.reshape(tensor.shape).to(tensor.dtype), rescale, density)


def bernoulli(
    tensor: torch.Tensor,
    density: float,
    rescale: str = "none",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``.

    The mask is ``U < density`` with U ~ U[0,1) drawn in float32 from
    ``generator`` (one draw per element, in flat order).
    """
    if density >= 1:
        return tensor
    work = _random_work_dtype(tensor)
    # mergekit fills the probability tensor in the work dtype: bfloat16 rounds it.
    keep = torch.tensor(density, dtype=work).item()
    mask = (_uniform(tensor.shape, tensor.device, generator) < keep).to(work)
    return _apply_mask(tensor.to(work), mask, rescale, keep).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str = "none",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MAGPRUNE: keep probability rises linearly with the magnitude rank
    within each row (dim 1; 1-D tensors are one row) from ``density - epsilon``
    (smallest) to ``density + epsilon`` (largest). Rows of a single element use
    ``density`` (mergekit would produce NaN probabilities there)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density +/- epsilon inside (0, 1)")
    shape = tensor.shape
    work = _random_work_dtype(tensor)
    rows = tensor.reshape(1, 1) if tensor.dim() == 0 else (
        tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    )
    ncols = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, ncols + 1, device=rows.device).view(
        1, ncols, *([1] * (rows.dim() - 2))
    ).expand_as(order)
    ranks = ranks.scatter_(1, order, positions).to(work)  # 1-based, in the work dtype
    if ncols > 1:
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=work, device=rows.device)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = (_uniform(rows.shape, rows.device, generator) < probs).to(work)
    out = _apply_mask(rows.to(work), mask, rescale, probs)
    return out.to(tensor.dtype).reshape(shape)


def sparsify(
    tensor: torch.Tensor,
    method: str,
    density: float,
    rescale: str = "none",
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Sparsified ``tensor``; with ``inplace`` the result may be ``tensor`` itself, modified."""
    if method == "magnitude":
        return magnitude(tensor, density, rescale, inplace=inplace)
    if method == "magnitude_outliers":
        return magnitude_outliers(tensor, density, rescale, gamma)
    if method == "random":
        return bernoulli(tensor, density, rescale, generator)
    if method == "della_magprune":
        return della_magprune(tensor, density, epsilon, rescale, generator)
    raise ValueError(f"unknown sparsification method {method!r}")
