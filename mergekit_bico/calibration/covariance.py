"""Paired cross-covariance statistics of two models on the same calibration tokens.

For every mapped space (see :mod:`mergekit_bico.architectures`) and every target block ``j`` with
source block ``i = layer_map[j]``, hooks capture per batch the rows of the source model (block i)
and of the target model (block j) token by token (padding excluded; a pooled ``(B, d)`` tensor
gives one row per sequence), and accumulate in float64::

    C   = X_A^T X_B          (d_A x d_B)
    trA = tr(X_A^T X_A),  trB = tr(X_B^T X_B)
    M_A = X_A^T X_A          only when d_A > d_B (needed for the residual of a narrowing map)

``X`` is the input of a linear (shared by q/k/v: one probe), ``G`` the gradient of the calibration
loss w.r.t. a linear's (or embedding's) output, ``Y`` the output itself. Both models run on each
batch (source first, its captures held, then target), so peak memory is the two models, the
accumulators of the current pass and one batch of captures.

``memory_budget`` splits the target blocks over several passes over the data, each holding the
accumulators (and captures) of its blocks only; :func:`plan_passes` does the packing.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from mergekit_bico.architectures import ArchSpec, EmbeddingRule, Probe
from mergekit_bico.errors import ConfigError, TransferError

logger = logging.getLogger(__name__)

__all__ = [
    "SpaceStats",
    "ModelCapture",
    "PairSpec",
    "parse_memory_budget",
    "pair_bytes",
    "plan_passes",
    "accumulate_pass",
    "collect_block_updates",
    "peak_rss_bytes",
]

StatKey = tuple[Optional[int], str, str]  # (layer, space, stat)


def parse_memory_budget(value: Any, *, model: str = "model") -> Optional[int]:
    """``memory_budget`` in bytes: an int, or a string with K/M/G/T suffix (powers of 1024); None = unlimited."""
    if value is None:
        return None
    from mergekit_bico.io.writer import parse_size

    try:
        n = parse_size(value)
    except ConfigError as err:
        raise ConfigError(f"transfer of '{model}': memory_budget: {err}") from None
    if n <= 0:
        raise ConfigError(f"transfer of '{model}': memory_budget must be positive, got {value!r}")
    return n


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---------------------------------------------------------------------------------------------
# Accumulators


@dataclass
class SpaceStats:
    """float64 accumulators for one (target layer, space, statistic) pair."""

    d_a: int
    d_b: int
    device: torch.device
    c: torch.Tensor = field(init=False)
    m_a: Optional[torch.Tensor] = field(init=False)
    tr_a: float = 0.0
    tr_b: float = 0.0
    rows: int = 0

    def __post_init__(self) -> None:
        self.c = torch.zeros(self.d_a, self.d_b, dtype=torch.float64, device=self.device)
        self.m_a = torch.zeros(self.d_a, self.d_a, dtype=torch.float64, device=self.device) if self.d_a > self.d_b else None

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if xa.shape[0] != xb.shape[0]:
            raise TransferError(f"paired statistics have {xa.shape[0]} source rows but {xb.shape[0]} target rows")
        xa = xa.to(torch.float64)
        xb = xb.to(torch.float64)
        self.c.addmm_(xa.T, xb)
        self.tr_a += float((xa * xa).sum())
        self.tr_b += float((xb * xb).sum())
        if self.m_a is not None:
            self.m_a.addmm_(xa.T, xa)
        self.rows += xa.shape[0]

    @staticmethod
    def nbytes(d_a: int, d_b: int) -> int:
        return 8 * (d_a * d_b + (d_a * d_a if d_a > d_b else 0))


@dataclass(frozen=True)
class PairSpec:
    """One statistic to accumulate: target (layer j, space, stat) paired with source layer i."""

    target_layer: Optional[int]
    source_layer: Optional[int]
    space: str
    stat: str
    d_a: int
    d_b: int


def pair_bytes(pair: PairSpec, tokens_per_batch: int) -> int:
    """Accumulators plus one batch of captured rows (float32) of both models."""
    return SpaceStats.nbytes(pair.d_a, pair.d_b) + 4 * tokens_per_batch * (pair.d_a + pair.d_b)


def plan_passes(
    pairs: Sequence[PairSpec], budget: Optional[int], tokens_per_batch: int, *, model: str = "target"
) -> list[list[PairSpec]]:
    """Group the pairs into passes by target block (global spaces go with the first group) so that
    each pass's :func:`pair_bytes` sum stays within ``budget`` (None: one pass)."""
    groups: dict[Optional[int], list[PairSpec]] = {}
    for p in pairs:
        groups.setdefault(p.target_layer, []).append(p)
    order = sorted(groups, key=lambda k: -1 if k is None else k)
    if budget is None:
        return [list(pairs)] if pairs else []
    passes: list[list[PairSpec]] = []
    current: list[PairSpec] = []
    used = 0
    for key in order:
        cost = sum(pair_bytes(p, tokens_per_batch) for p in groups[key])
        if cost > budget:
            where = "global spaces" if key is None else f"block {key}"
            raise TransferError(
                f"transfer to '{model}': memory_budget of {budget} bytes is smaller than the statistics of {where} "
                f"({cost} bytes); raise memory_budget to at least {cost}"
            )
        if current and used + cost > budget:
            passes.append(current)
            current, used = [], 0
        current.extend(groups[key])
        used += cost
    if current:
        passes.append(current)
    return passes


# ---------------------------------------------------------------------------------------------
# Hooks


def _rows(t: torch.Tensor, mask: Optional[torch.Tensor], part: int, parts: int) -> torch.Tensor:
    """Masked rows of a captured ``(B, T, d)`` (or pooled ``(B, d)``) tensor; one slice of a fused output."""
    t = t.detach()
    if parts > 1:
        width = t.shape[-1] // parts
        t = t[..., part * width:(part + 1) * width]
    if mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask].reshape(-1, t.shape[-1])
    return t.reshape(-1, t.shape[-1])


class ModelCapture:
    """Forward / gradient hooks on one loaded model for a set of probes.

    ``leaf_embeddings``: make every embedding output a fresh leaf that requires grad, so that
    output gradients flow with all parameters frozen (no parameter gradients are allocated).
    """

    def __init__(self, model: torch.nn.Module, arch: ArchSpec, probes: Iterable[Probe], *, leaf_embeddings: bool = False):
        self.model = model
        self.arch = arch
        self.probes = list(probes)
        self.leaf_embeddings = leaf_embeddings
        self.captured: dict[StatKey, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._mask: Optional[torch.Tensor] = None

    def __enter__(self) -> "ModelCapture":
        modules = dict(self.model.named_modules())
        if self.leaf_embeddings:
            for path, module in modules.items():
                _, _, rule = self.arch.parse_module(path)
                if isinstance(rule, EmbeddingRule):
                    self._handles.append(module.register_forward_hook(_make_leaf))
        by_module: dict[str, list[Probe]] = {}
        for p in self.probes:
            if p.module not in modules:
                raise TransferError(f"module '{p.module}' not found in model {type(self.model).__name__}")
            by_module.setdefault(p.module, []).append(p)
        for path, probes in by_module.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(probes)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, probes: list[Probe]) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            for p in probes:
                key = (p.layer, p.space, p.stat)
                if p.site == "in":
                    x = args[0] if args else None
                    if isinstance(x, torch.Tensor):
                        self.captured.setdefault(key, []).append(_rows(x, self._mask, p.part, p.parts))
                elif p.site == "out":
                    self.captured.setdefault(key, []).append(_rows(out, self._mask, p.part, p.parts))
                elif p.site == "grad" and isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(self._grad_hook(key, p))

        return hook

    def _grad_hook(self, key: StatKey, p: Probe) -> Callable:
        mask = self._mask

        def hook(grad: torch.Tensor) -> None:
            self.captured.setdefault(key, []).append(_rows(grad, mask, p.part, p.parts))

        return hook

    def run(self, batch: Mapping[str, torch.Tensor], loss_fn: Optional[Callable], *, device: str, batch_index: int) -> dict[StatKey, torch.Tensor]:
        """One forward (and backward when ``loss_fn``) pass; returns the captured rows per key."""
        self.captured = {}
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch.get("attention_mask")
        self._mask = mask.bool() if mask is not None else None
        from mergekit_bico.calibration.losses import model_inputs

        if loss_fn is None:
            with torch.no_grad():
                self.model(**model_inputs(batch))
        else:
            loss = loss_fn(self.model, batch, batch_index)
            loss.backward()
        out = {k: (v[0] if len(v) == 1 else torch.cat(v, dim=0)) for k, v in self.captured.items()}
        self.captured = {}
        return out


def _make_leaf(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_(True)


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Parameters do not require grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# Passes


def accumulate_pass(
    *,
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    arch_a: ArchSpec,
    arch_b: ArchSpec,
    probes_a: Sequence[Probe],
    probes_b: Sequence[Probe],
    pairs: Sequence[PairSpec],
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_a: Optional[Callable],
    loss_b: Optional[Callable],
    device: str = "cpu",
    progress: bool = False,
    desc: str = "statistics",
) -> tuple[dict[tuple[Optional[int], str, str], SpaceStats], int]:
    """Run both models over ``batches`` and accumulate every pair's statistics.

    Returns ``({(target_layer, space, stat): SpaceStats}, peak accounted bytes)``. Without losses
    (activations only) no backward pass runs.
    """
    need_a = {(p.source_layer, p.space, p.stat) for p in pairs}
    need_b = {(p.target_layer, p.space, p.stat) for p in pairs}
    pa = [p for p in probes_a if (p.layer, p.space, p.stat) in need_a]
    pb = [p for p in probes_b if (p.layer, p.space, p.stat) in need_b]
    missing_a = need_a - {(p.layer, p.space, p.stat) for p in pa}
    missing_b = need_b - {(p.layer, p.space, p.stat) for p in pb}
    if missing_a or missing_b:
        k = sorted(missing_a or missing_b, key=str)[0]
        which = "source" if missing_a else "target"
        raise TransferError(f"no module provides space '{k[1]}' (layer {k[0]}, statistic {k[2]}) in the {which} model")
    dev = torch.device(device)
    stats = {(p.target_layer, p.space, p.stat): SpaceStats(p.d_a, p.d_b, dev) for p in pairs}
    accounted = sum(SpaceStats.nbytes(p.d_a, p.d_b) for p in pairs)
    peak = accounted
    iterator: Iterable = enumerate(batches)
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(batches), desc=desc, leave=False)
        except ImportError:  # pragma: no cover
            pass
    use_grad = loss_a is not None
    ctx_a = frozen_parameters(model_a) if use_grad else contextlib.nullcontext()
    ctx_b = frozen_parameters(model_b) if use_grad else contextlib.nullcontext()
    with ctx_a, ctx_b, ModelCapture(model_a, arch_a, pa, leaf_embeddings=use_grad) as cap_a, \
            ModelCapture(model_b, arch_b, pb, leaf_embeddings=use_grad) as cap_b:
        for index, batch in iterator:
            rows_a = cap_a.run(batch, loss_a, device=device, batch_index=index)
            rows_b = cap_b.run(batch, loss_b, device=device, batch_index=index)
            held = sum(t.numel() * t.element_size() for t in rows_a.values()) + \
                sum(t.numel() * t.element_size() for t in rows_b.values())
            peak = max(peak, accounted + held)
            for p in pairs:
                xa = rows_a.get((p.source_layer, p.space, p.stat))
                xb = rows_b.get((p.target_layer, p.space, p.stat))
                if xa is None or xb is None:
                    continue  # e.g. no gradient reached this module on this batch
                if xa.shape[1] != p.d_a or xb.shape[1] != p.d_b:
                    raise TransferError(
                        f"space '{p.space}' of block {p.target_layer}: captured widths {xa.shape[1]}/{xb.shape[1]} "
                        f"differ from the checkpoint's {p.d_a}/{p.d_b}"
                    )
                stats[(p.target_layer, p.space, p.stat)].add(xa, xb)
            del rows_a, rows_b
    return stats, peak


def collect_block_updates(
    model: torch.nn.Module,
    arch: ArchSpec,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
    max_tokens: int = 512,
) -> tuple[list[torch.Tensor], list[float]]:
    """Per block: the first ``max_tokens`` non-padding rows of (block output - block input), and the
    relative update size ``||out - in||_F / ||in||_F`` over those rows. Forward passes only."""
    blocks: dict[int, torch.nn.Module] = {}
    for path, module in model.named_modules():
        layer = arch.is_block_module(path)
        if layer is not None:
            blocks[layer] = module
    if not blocks:
        raise TransferError(f"no blocks found in {type(model).__name__}")
    updates: dict[int, list[torch.Tensor]] = {k: [] for k in blocks}
    norms_in: dict[int, float] = {k: 0.0 for k in blocks}
    norms_up: dict[int, float] = {k: 0.0 for k in blocks}
    count = {k: 0 for k in blocks}
    state: dict[str, Optional[torch.Tensor]] = {"mask": None}

    def make_hook(layer: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if count[layer] >= max_tokens:
                return
            h_in = args[0] if args else kwargs.get("hidden_states")
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(h_in, torch.Tensor) or not isinstance(h_out, torch.Tensor):
                return
            x_in = _rows(h_in, state["mask"], 0, 1).to(torch.float64)
            x_up = _rows(h_out, state["mask"], 0, 1).to(torch.float64) - x_in
            take = min(max_tokens - count[layer], x_up.shape[0])
            updates[layer].append(x_up[:take].to(torch.float32).cpu())
            norms_in[layer] += float((x_in[:take] ** 2).sum())
            norms_up[layer] += float((x_up[:take] ** 2).sum())
            count[layer] += take

        return hook

    handles = [blocks[k].register_forward_hook(make_hook(k), with_kwargs=True) for k in blocks]
    from mergekit_bico.calibration.losses import model_inputs

    try:
        with torch.no_grad():
            for batch in batches:
                if min(count.values()) >= max_tokens:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                state["mask"] = mask.bool() if mask is not None else None
                model(**model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    order = sorted(blocks)
    rows = [torch.cat(updates[k], dim=0) if updates[k] else torch.zeros(0, 1) for k in order]
    rel = [(norms_up[k] / norms_in[k]) ** 0.5 if norms_in[k] > 0 else 0.0 for k in order]
    return rows, rel
