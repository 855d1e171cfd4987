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

from mergekit_bico.dtypes import torch

__all__ = [
    "RESCALE_MODES",
    "coerce_rescale",
    "kth_smallest_key",
    "select_largest",
    "select_smallest",
    "select_sorted_range",
    "TIE_BREAKS",
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


TIE_BREAKS = ("index", "sort")


def _sorted_positions(keys: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Bool mask of the elements at sorted positions ``start:stop`` of ``|x|``, sorted exactly as
    mergekit 0.1.5 sorts (``torch.sort`` of the float32 magnitudes, whose order among equal
    values is unspecified but deterministic for one torch build). ``tie_break: sort`` only."""
    order = torch.sort(keys.view(torch.float32), descending=descending).indices
    mask = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    mask[order[start:stop]] = True
    return mask


def _first_equal(mask: torch.Tensor, keys: torch.Tensor, key: int, count: int) -> torch.Tensor:
    """Add to ``mask`` the ``count`` lowest-index elements whose key is ``key``."""
    if count > 0:
        mask[torch.nonzero(keys == key).reshape(-1)[:count]] = True
    return mask


def _clean_cut(keys: torch.Tensor, k: int) -> bool:
    """Whether a cut after the k smallest keys falls between two different keys (no tie to break)."""
    n = keys.numel()
    return k <= 0 or k >= n or _kth_smallest(keys, k)[2] == k


def select_smallest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest keys, ties to the lower indices: the first k of a stable
    ascending sort, by radix select (O(n))."""
    n = keys.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    key, less, less_eq = _kth_smallest(keys, k)
    if less_eq == k:
        return keys <= key
    return _first_equal(keys < key, keys, key, k - less)


def select_largest(keys: torch.Tensor, k: int, tie_break: str = "index") -> torch.Tensor:
    """Bool mask of the k largest keys (TIES' top-k magnitudes), by radix select (O(n), no sort).

    Where the k-th largest magnitude is shared across the cut, ``tie_break`` decides which of the
    equal elements are kept: ``index`` the lowest flat indices (a stable sort's choice; sliceable),
    ``sort`` those ``torch.argsort(|x|, descending=True)[:k]`` keeps (mergekit 0.1.5's call: an
    unstable sort, so this costs that sort of the whole tensor).
    """
    n = keys.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=keys.device)
    key, _less, less_eq = _kth_smallest(keys, n - k)   # the largest key dropped
    if less_eq == n - k:
        return keys > key
    if tie_break == "sort":
        return _sorted_positions(keys, 0, k, descending=True)
    return _first_equal(keys > key, keys, key, k - (n - less_eq))


def select_sorted_range(keys: torch.Tensor, start: int, stop: int, tie_break: str = "index") -> torch.Tensor:
    """Bool mask of ascending sorted positions ``start:stop`` (breadcrumbs); ties at a cut as in
    :func:`select_largest` (``sort``: mergekit's ``torch.sort(|x|).indices[start:stop]``)."""
    n = keys.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros(n, dtype=torch.bool, device=keys.device)
    if tie_break == "sort" and not (_clean_cut(keys, start) and _clean_cut(keys, stop)):
        return _sorted_positions(keys, start, stop, descending=False)
    return select_smallest(keys, stop) & ~select_smallest(keys, start)


class MagnitudeThreshold:
    """Top-k magnitude pruning of a tensor processed in consecutive flat slices.

    Built from the whole tensor's key histograms (:meth:`from_histograms`); :meth:`apply` on the
    slices, in order, keeps exactly the set ``select_largest(..., tie_break="index")`` keeps for
    the whole tensor (keys above the largest dropped key, plus the first ``ties_left`` elements
    equal to it). ``ambiguous``: the cut falls inside a run of equal magnitudes, where
    ``tie_break: sort`` needs the whole tensor's sort (the caller then merges it whole).
    """

    __slots__ = ("key", "ties_left", "ambiguous")

    def __init__(self, key: int, ties_left: int = 0) -> None:
        self.key, self.ties_left, self.ambiguous = key, ties_left, ties_left > 0

    @staticmethod
    def high_histogram(keys: torch.Tensor) -> torch.Tensor:
        return torch.bincount(keys >> 16, minlength=1 << 15)

    @staticmethod
    def pick_digit(high_hist: torch.Tensor, numel: int, k: int) -> tuple[int, int]:
        """(high digit of the (numel-k)-th smallest key, number of keys below that digit)."""
        counts = high_hist.cumsum(0)
        digit = int(torch.searchsorted(counts, torch.tensor(numel - k)))
        return digit, int(counts[digit - 1]) if digit > 0 else 0

    @staticmethod
    def low_histogram(keys: torch.Tensor, digit: int) -> torch.Tensor:
        low = torch.masked_select(keys, (keys >> 16) == digit) & 0xFFFF
        return torch.bincount(low, minlength=1 << 16)

    @classmethod
    def from_histograms(cls, low_hist: torch.Tensor, digit: int, below: int, numel: int, k: int) -> "MagnitudeThreshold":
        """Keep the k largest of ``numel`` keys (1 <= k < numel)."""
        counts = low_hist.cumsum(0)
        low_digit = int(torch.searchsorted(counts, torch.tensor(numel - k - below)))
        less_eq = below + int(counts[low_digit])
        return cls((digit << 16) | low_digit, ties_left=k - (numel - less_eq))

    @classmethod
    def drop_all(cls) -> "MagnitudeThreshold":
        """Keeps nothing (density 0): every key is <= the largest int32."""
        return cls(0x7FFFFFFF)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the dropped entries of this slice of the delta, in place."""
        keys = magnitude_keys(delta)
        mask = keys > self.key
        if self.ties_left > 0:
            before = int(mask.sum())
            _first_equal(mask, keys, self.key, self.ties_left)
            self.ties_left -= int(mask.sum()) - before
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
    tensor: torch.Tensor, density: float, rescale: str = "none", inplace: bool = False, tie_break: str = "index"
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
    mask = select_largest(magnitude_keys(tensor), k, tie_break).reshape(tensor.shape)
    if inplace and rescale == "none":
        return tensor.mul_(mask)  # x * 1 / x * 0, as mergekit's float mask
    return _apply_mask(tensor, mask.to(tensor.dtype), rescale, density)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, rescale: str = "none", gamma: float = 0.01, tie_break: str = "index"
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
    mask = select_sorted_range(magnitude_keys(tensor), n_bot, n_bot + target, tie_break)
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
    tie_break: str = "index",
) -> torch.Tensor:
    """Sparsified ``tensor``; with ``inplace`` the result may be ``tensor`` itself, modified."""
    if method == "magnitude":
        return magnitude(tensor, density, rescale, inplace=inplace, tie_break=tie_break)
    if method == "magnitude_outliers":
        return magnitude_outliers(tensor, density, rescale, gamma, tie_break=tie_break)
    if method == "random":
        return bernoulli(tensor, density, rescale, generator)
    if method == "della_magprune":
        return della_magprune(tensor, density, epsilon, rescale, generator)
    raise ValueError(f"unknown sparsification method {method!r}")
