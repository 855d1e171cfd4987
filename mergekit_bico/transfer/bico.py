"""BiCo: Bilinear Coordinate alignment (training-free task-vector transfer, arXiv 2605.28444).

For a linear ``y = W x`` the fine-tuning delta is a sum of outer products ``g x^T`` of output
gradients and inputs. With paired calibration tokens, Procrustes on ``C_in = X_A^T X_B`` and
``C_out = G_A^T G_B`` gives (semi-)orthogonal maps ``R_in``, ``R_out`` (d_A x d_B, ``x_B ~ R^T x_A``)
and the delta in the target's coordinates is ``R_out^T (W_A' - W_A) R_in`` (bias: ``R_out^T db``).

Rules for the tensors that are not plain linears (why: each is the exact answer when the target
is a function-preserving reparametrisation ``x_B = R^T x_A`` of the source):

* **Embeddings** (token, position, token-type tables, n x d): a linear on one-hot ids. The id
  space is an identity space (tokenisations are checked to be equal), the hidden axis is the
  embedding's *output* space, mapped by the Procrustes map of the gradient (or activation)
  statistics at the embedding output: ``dE_B = dE_A R_out``. A table whose row count differs
  (vocabulary, number of positions) is not transferred (reported).
* **lm_head / classifier / MLM decoder**: plain linears whose output is an identity space
  (vocab / labels): ``dW_B = dW_A R_in``. A tied lm_head is the embedding tensor and follows the
  embedding rule.
* **Norm gains and biases** -- rule ``fold`` (default, *gain folding*): a norm that only feeds
  linears (pre-LN: Llama/Mistral/Qwen2 input/post-attention/final norms, GPT-2 ln_1/ln_2) is
  folded into its consumers. With the source base's norm gain ``g`` (norm bias ``beta``) and the
  fine-tune's ``g'`` (``beta'``), the fine-tune equals the *base* norm followed by the effective
  linear ``W'_eff = W' diag(g'/g)``, ``c'_eff = c' + W' (beta' - (g'/g) * beta)`` (``c'``: the
  linear's own bias); we transfer
  ``W'_eff - W`` (which lives in exactly the coordinates the statistics ``X`` were taken in) and the
  norm's own delta is zero. This is exact under rotations, where no diagonal gain could carry the
  change. Fallback *diagonal conjugation* (rule ``diagonal``, post-LN norms such as BERT's whose
  output is also the residual stream, GPT-2's ``ln_f`` whose consumer is the tied embedding, or a
  source gain with (near) zero entries): ``dg_B = diag(R^T diag(dg_A) R) = (R * R)^T dg_A`` (the
  Frobenius-closest diagonal; exact for permutations and sign flips, and for zero-padded widening)
  and ``db_B = R^T db_A``, with ``R`` the map of the norm's output space.
* **Heads**: q/k/v/o spaces are mapped as flat (semi-)orthogonal maps. When head counts differ the
  map stays semi-orthogonal over the concatenated heads; it is exact when the target's heads
  contain the source's (permuted, or extra zero-initialised heads), and otherwise may mix heads
  (with RoPE, mixing inside a head is only approximately meaningful); the report notes the mismatch.
* ``scale``: ``none`` (default) carries the delta by orthogonal maps only. ``norms`` also
  matches the two models' scales: if ``x_B = alpha R_in^T x_A`` and ``y_B = beta R_out^T y_A``
  (so ``g_B = R_out^T g_A / beta``), the delta with the same first-order effect on the loss,
  ``g_B^T dW_B x_B = g_A^T dW_A x_A``, is ``(beta / alpha) R_out^T dW_A R_in``; ``1/alpha`` and
  ``beta`` are estimated per space from the statistics' norms (``sqrt(tr_A / tr_B)`` of X and of G;
  ``sqrt(tr_B / tr_A)`` of Y), biases take ``beta``, embeddings the factor of their output space.
  Both are exact on orthogonal reparametrisations (all factors 1); norms' gains are not scaled.
* ``tie_maps``: one map for the spaces of a block that must share coordinates for the block's
  function to carry over (``ArchSpec.tied_spaces``: queries with keys, values with the output
  projection's input, an MLP's hidden outputs with the down projection's inputs), fitted from all
  their statistics at once (normalised sum). Exact on the reparametrisations above; with few
  tokens (or near rank-one gradients) it pins down directions one space's statistics leave free.
* ``output_space``: ``gradients`` (default) uses ``G`` for output spaces; ``activations`` uses
  the outputs ``Y`` (Theseus) -- these cannot determine the output map of an expanding linear
  (``rank(Y) <= d_in < d_out``, e.g. gate/up projections), which gradients do; ``combined`` runs Procrustes on the row-concatenation of the two
  statistics, each normalised to unit Frobenius norm per model:
  ``C = G_A^T G_B / (|G_A| |G_B|) + Y_A^T Y_B / (|Y_A| |Y_B|)``. Both agree on a true
  reparametrisation; when one is rank-deficient (few tokens, dead gradients, low-rank ``W``) the
  other fills the missing directions, which is why we concatenate rather than choose.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from mergekit_bico.architectures import IDENTITY_SPACES, LinearRule, NormRule, TensorSpec
from mergekit_bico.calibration.covariance import (
    PairSpec,
    SpaceStats,
    accumulate_pass,
    collect_block_updates,
    parse_memory_budget,
    peak_rss_bytes,
    plan_passes,
)
from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError, TransferError
from mergekit_bico.transfer.api import PreparedTransfer, TransferContext, Untransferable, resolve_layer_map
from mergekit_bico.transfer.layermap import DEAD_BLOCK_RTOL, centered_gram, cka_matrix, similarity_layer_map
from mergekit_bico.transfer.procrustes import AUTO_PRIOR_RULE, DEFAULT_RTOL, WELL_DETERMINED_RTOL, procrustes_batched, relative_residual
from mergekit_bico.transfer.report import TransferReport

logger = logging.getLogger(__name__)

__all__ = ["prepare_bico", "BicoTransfer", "MapSet", "fit_maps", "load_calibration", "similarity_map"]

MAPS_VERSION = "bico-maps-v2"
OUTPUT_STATS = {"gradients": ("G",), "activations": ("Y",), "combined": ("G", "Y")}
GAIN_SUFFIX = "#gain"
FOLD_GAIN_RTOL = 1e-6
CKA_TOKENS = 512


# ---------------------------------------------------------------------------------------------
# Calibration models and data (shared with the baselines)


def load_calibration(
    paths: Sequence[Path], calibration: CalibrationConfig, *, device: str
) -> tuple[list[torch.nn.Module], list[dict[str, torch.Tensor]], list[Any], str]:
    """Load each model for calibration and tokenise the calibration texts with each tokenizer.

    Returns ``(models, batches, losses, loss kind)``. Tokenisations must be identical (token ids and
    masks), else TransferError naming the two models: BiCo pairs tokens one to one.
    """
    from mergekit_bico.calibration import data, losses, models

    model_config = models.read_model_config(paths[-1])
    kind = losses.loss_kind(calibration, model_config)
    causal = kind == losses.CAUSAL_LM or (kind == losses.CUSTOM and losses.head_kind(model_config) == losses.CAUSAL_LM)
    samples = data.load_samples(calibration, need_labels=kind == losses.SEQUENCE_CLASSIFICATION)
    loaded = [models.load_model(p, calibration, device=device) for p in paths]
    batch_sets = [data.make_batches(samples, tok, calibration, causal_lm=causal) for _, tok in loaded]
    ref = batch_sets[-1]
    for path, batches in zip(paths[:-1], batch_sets[:-1]):
        for n, (b1, b2) in enumerate(zip(batches, ref)):
            same = (
                b1["input_ids"].shape == b2["input_ids"].shape
                and torch.equal(b1["input_ids"], b2["input_ids"])
                and torch.equal(b1["attention_mask"], b2["attention_mask"])
            )
            if not same:
                raise TransferError(
                    f"the tokenizers of '{path}' and '{paths[-1]}' give different token ids on the calibration texts "
                    f"(batch {n}); BiCo pairs tokens one to one and needs identical tokenization"
                )
    loss_fns = [losses.resolve_loss(calibration, m) for m, _ in loaded]
    return [m for m, _ in loaded], ref, loss_fns, kind


def similarity_map(
    model_a: torch.nn.Module, model_b: torch.nn.Module, ctx: TransferContext, batches: Sequence[dict], *, device: str
) -> tuple[list[Optional[int]], torch.Tensor, list[float], list[float]]:
    """Layer map by linear CKA of block updates (see :mod:`mergekit_bico.transfer.layermap`)."""
    rows_a, rel_a = collect_block_updates(model_a, ctx.arch_source, batches, device=device, max_tokens=CKA_TOKENS)
    rows_b, rel_b = collect_block_updates(model_b, ctx.arch_target, batches, device=device, max_tokens=CKA_TOKENS)
    n = min(r.shape[0] for r in rows_a + rows_b)
    grams_a = [centered_gram(r[:n]) for r in rows_a]
    grams_b = [centered_gram(r[:n]) for r in rows_b]
    sim = cka_matrix(grams_a, grams_b)
    dead = [r < DEAD_BLOCK_RTOL for r in rel_b]
    return similarity_layer_map(sim, dead), sim, rel_a, rel_b


# ---------------------------------------------------------------------------------------------
# Fitting


def _map_name(layer: Optional[int], space: str) -> str:
    return f"{'global' if layer is None else layer}:{space}"


def _combine(parts: Sequence[tuple[str, SpaceStats]]) -> dict[str, Any]:
    """One cross-covariance from one or several statistics: a single one as it is; several (a
    ``combined`` output space, or tied spaces) each normalised to unit Frobenius norm on both sides
    and summed, so that none dominates by its scale. Statistics without signal are left out."""
    if len(parts) == 1:
        stat, s = parts[0]
        return {"c": s.c, "tr_a": s.tr_a, "tr_b": s.tr_b, "m_a": s.m_a, "stat": stat}
    c = torch.zeros_like(parts[0][1].c)
    m_a = None if parts[0][1].m_a is None else torch.zeros_like(parts[0][1].m_a)
    tr_a = tr_b = 0.0
    for _, st in parts:
        if st.tr_a <= 0 or st.tr_b <= 0:
            continue
        c = c + st.c / (st.tr_a ** 0.5 * st.tr_b ** 0.5)
        if m_a is not None:
            m_a = m_a + st.m_a / st.tr_a
        tr_a += 1.0
        tr_b += 1.0
    return {"c": c, "tr_a": tr_a, "tr_b": tr_b, "m_a": m_a, "stat": "+".join(p for p, _ in parts)}


def _residual(r: torch.Tensor, comb: dict[str, Any]) -> Optional[float]:
    if comb["tr_b"] <= 0:
        return None
    d_a, d_b = comb["c"].shape
    kwargs = {"m_a": comb["m_a"]} if d_a > d_b else {"trace_a": comb["tr_a"]}
    return relative_residual(r, float((r * comb["c"]).sum()), comb["tr_b"], **kwargs)


def fit_maps(
    stats: dict[tuple[Optional[int], str, str], SpaceStats],
    pairs: Sequence[PairSpec],
    *,
    rtol: float = DEFAULT_RTOL,
    ties: Sequence[tuple[str, ...]] = (),
    prior: Union[float, str] = 0.0,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Procrustes maps for every (target layer, space) of one pass, SVDs batched by shape.

    Output spaces with both ``G`` and ``Y`` statistics use the combined rule (normalised sum).
    ``ties``: groups of spaces of one block that must share one map (same sizes on both sides);
    the map is fitted once from all their statistics (normalised sum) and stored under each name.
    ``prior``: identity prior of the Procrustes fits (``identity_prior``; 0: none; ``"auto"``: chosen
    per space, recorded in its report row as ``identity_prior``).
    Returns ``({map name: R float32 (d_A, d_B)}, report rows)``.
    """
    groups: dict[tuple[Optional[int], str], list[PairSpec]] = {}
    for p in pairs:
        groups.setdefault((p.target_layer, p.space), []).append(p)
    units: list[list[tuple[Optional[int], str]]] = []
    tied: set[tuple[Optional[int], str]] = set()
    for (layer, space) in list(groups):
        if (layer, space) in tied or layer is None:
            continue
        for tie in ties:
            members = [(layer, t) for t in tie if (layer, t) in groups]
            dims = {(groups[m][0].d_a, groups[m][0].d_b) for m in members}
            if space in tie and len(members) > 1 and len(dims) == 1:
                units.append(members)
                tied.update(members)
                break
    units += [[key] for key in groups if key not in tied]
    entries = []
    for members in units:
        per_member = {m: [(p.stat, stats[(m[0], m[1], p.stat)]) for p in groups[m]] for m in members}
        comb = _combine([part for m in members for part in per_member[m]])
        entries.append(dict(members=members, per_member=per_member, comb=comb,
                            source_layer=groups[members[0]][0].source_layer,
                            rows=per_member[members[0]][0][1].rows))
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, e in enumerate(entries):
        by_shape.setdefault(tuple(e["comb"]["c"].shape), []).append(k)
    maps: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    fits: dict[int, Any] = {}
    for shape, idx in by_shape.items():
        stack = torch.stack([entries[k]["comb"]["c"] for k in idx])
        traces = torch.tensor([[float(entries[k]["comb"]["tr_a"]), float(entries[k]["comb"]["tr_b"])] for k in idx],
                              dtype=torch.float64)
        for k, fit in zip(idx, procrustes_batched(stack, rtol=rtol, prior=prior, traces=traces)):
            fits[k] = fit
    for k, e in enumerate(entries):
        fit = fits[k]
        d_a, d_b = e["comb"]["c"].shape
        for layer, space in e["members"]:
            parts = e["per_member"][(layer, space)]
            own = _combine(parts)
            row: dict[str, Any] = {
                "layer": layer, "source_layer": e["source_layer"], "space": space, "stat": own["stat"],
                "d_source": d_a, "d_target": d_b, "rank": fit.rank,
                "well_determined_rank": _count(fit.singular_values, WELL_DETERMINED_RTOL),
                "min_singular_ratio": _ratio(fit.singular_values), "tokens": e["rows"],
                "residual": _residual(fit.r, own),
            }
            if len(e["members"]) > 1:
                row["tied"] = "+".join(m for _, m in e["members"])
            if len(parts) > 1:
                for stat, st in parts:
                    row[f"residual_{stat}"] = _residual(fit.r, _combine([(stat, st)]))
            if prior:
                row["identity_prior"] = fit.prior
            if prior == "auto":
                row["best_fit_misfit"] = fit.misfit
            if fit.rank < min(d_a, d_b) and not fit.prior:
                row["note"] = "rank-deficient statistics: unseen directions completed closest to identity"
            rows.append(row)
            if fit.rank == 0:
                row["note"] = "no signal (all-zero statistics): not mapped; tensors using this space are not transferred"
                continue
            maps[_map_name(layer, space)] = fit.r.to(torch.float32).cpu()
            gain = _gain(parts)
            if gain is not None:
                row["gain"] = gain
                maps[_map_name(layer, space) + GAIN_SUFFIX] = torch.tensor(gain, dtype=torch.float64)
    return maps, rows


def _gain(parts: list[tuple[str, SpaceStats]]) -> Optional[float]:
    """The factor ``scale: norms`` applies for this space (see :class:`BicoTransfer`):
    ``||x_A|| / ||x_B||`` for inputs (X) and ``||g_A|| / ||g_B||`` for output gradients (G), i.e.
    ``sqrt(tr_A / tr_B)``; ``||y_B|| / ||y_A||`` for output activations (Y). A combined output
    space uses its gradients. None when a side has no signal."""
    stats = dict(parts)
    stat = "G" if "G" in stats else next(iter(stats))
    s = stats[stat]
    if s.tr_a <= 0 or s.tr_b <= 0:
        return None
    ratio = (s.tr_a / s.tr_b) ** 0.5
    return 1.0 / ratio if stat == "Y" else ratio


def _count(s: torch.Tensor, rtol: float) -> int:
    return int((s > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0


def _ratio(s: torch.Tensor) -> Optional[float]:
    return float(s[-1] / s[0]) if s.numel() and float(s[0]) > 0 else None


# ---------------------------------------------------------------------------------------------
# Maps on disk


class MapSet:
    """Fitted maps, read lazily from the pass files of the statistics cache.

    A small LRU cache keeps recently used maps (float32) up to ``cache_bytes``: the executor asks
    for deltas block by block, so one block's maps are read once.
    """

    def __init__(self, store: Any, parts: list[dict[str, Any]], fingerprint: str, cache_bytes: int = 2 << 30):
        self.files = []
        self.where: dict[str, int] = {}
        for k, part in enumerate(parts):
            path = store.lookup("bico_maps", part["key"])
            if path is None:
                raise FileNotFoundError(part["key"])
            self.files.append(store.open(path, model_fingerprint=fingerprint))
            for name in part["maps"]:
                self.where[name] = k
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_bytes = cache_bytes
        self._held = 0

    def paths(self) -> list[str]:
        return [str(f.path) for f in self.files]

    def gain(self, layer: Optional[int], space: str) -> float:
        """The space's ``scale: norms`` factor (1.0 when none was recorded)."""
        g = self._read(_map_name(layer, space) + GAIN_SUFFIX)
        return 1.0 if g is None else float(g)

    def get(self, layer: Optional[int], space: str) -> Optional[torch.Tensor]:
        """The map (d_A, d_B), float32, or None when no statistics were fitted for it."""
        return self._read(_map_name(layer, space))

    def _read(self, name: str) -> Optional[torch.Tensor]:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        k = self.where.get(name)
        if k is None:
            return None
        r = self.files[k].get(name)
        size = r.numel() * r.element_size()
        while self.cache and self._held + size > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()
        if size <= self.cache_bytes:
            self.cache[name] = r
            self._held += size
        return r


# ---------------------------------------------------------------------------------------------
# Preparation


def _calibration_parts(calibration: CalibrationConfig) -> dict[str, Any]:
    d = calibration.model_dump()
    d.pop("data", None)
    return d


def _head_notes(ctx: TransferContext, report: TransferReport) -> None:
    ca, cb = ctx.source_base.config_dict(), ctx.target.config_dict()
    for key in ("num_attention_heads", "n_head", "num_key_value_heads", "head_dim"):
        if key in ca and key in cb and ca[key] != cb[key]:
            report.note(
                f"{key} differs (source {ca[key]}, target {cb[key]}): q/k/v/o spaces are mapped by flat semi-orthogonal maps "
                "over the concatenated heads (exact when the target's heads contain the source's, may mix heads otherwise)"
            )


def _dropped_notes(ctx: TransferContext, report: TransferReport) -> None:
    """Source roles without any target tensor (e.g. an untied lm_head onto a tied target): their
    delta has nowhere to go; say so instead of dropping it silently."""
    target_roles = {(s.layer is None, s.role, s.kind) for s in ctx.target_specs.values()}
    seen: set[tuple[bool, str, str]] = set()
    for name, spec in ctx.source_specs.items():
        key = (spec.layer is None, spec.role, spec.kind)
        if spec.kind in ("buffer", "unknown") or key in target_roles or key in seen:
            continue
        seen.add(key)
        where = "" if spec.layer is None else " (per block)"
        report.note(f"source tensor '{name}'{where} has no counterpart in the target: its delta is not transferred")
    for name, spec in ctx.source_specs.items():
        if spec.kind == "unknown":
            report.note(f"source tensor '{name}' has no known role: not transferred")


def prepare_bico(
    ctx: TransferContext,
    calibration: CalibrationConfig,
    *,
    cache_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    norm_rule: str = "fold",
    rtol: float = DEFAULT_RTOL,
) -> "BicoTransfer":
    from mergekit_bico.calibration import data
    from mergekit_bico.calibration.models import tokenizer_fingerprint
    from mergekit_bico.calibration.store import StatsStore

    cfg = ctx.cfg
    budget = parse_memory_budget(cfg.memory_budget, model=str(ctx.source_ft_path))
    stats_path = ctx.source_ft_path if cfg.statistics == "finetuned" else ctx.source_base_path
    stats_model = ctx.source_ft if cfg.statistics == "finetuned" else ctx.source_base
    report = TransferReport(
        method="bico",
        family=ctx.family,
        source_base=str(ctx.source_base_path),
        source_finetuned=str(ctx.source_ft_path),
        target_base=str(ctx.target_path),
        settings={
            "statistics": cfg.statistics, "output_space": cfg.output_space, "layer_map": cfg.layer_map,
            "scale": cfg.scale, "tie_maps": cfg.tie_maps, "identity_prior": cfg.identity_prior,
            "memory_budget": cfg.memory_budget, "norm_rule": norm_rule, "rank_rtol": rtol,
            "calibration": {k: v for k, v in calibration.model_dump().items()},
        },
        blocks={"source": ctx.layers_source, "target": ctx.layers_target},
    )
    _head_notes(ctx, report)
    _dropped_notes(ctx, report)
    static_map = resolve_layer_map(ctx)
    store = StatsStore(cache_dir)
    fp_target = ctx.target.fingerprint()
    key = store.key(
        "bico_index",
        version=MAPS_VERSION,
        source=stats_model.fingerprint(),
        target=fp_target,
        data=data.data_fingerprint(calibration),
        calibration=_calibration_parts(calibration),
        tokenizers=[tokenizer_fingerprint(stats_path), tokenizer_fingerprint(ctx.target_path)],
        output_space=cfg.output_space,
        tie_maps=cfg.tie_maps,
        layer_map=cfg.layer_map,
        rtol=rtol,
        # only when set: maps cached before the option existed stay valid; "auto" names its rule
        **({"identity_prior": cfg.identity_prior} if cfg.identity_prior else {}),
        **({"auto_prior_rule": AUTO_PRIOR_RULE} if cfg.identity_prior == "auto" else {}),
    )
    manifest_path = store.lookup("bico_index", key)
    if manifest_path is not None:
        try:
            with store.open(manifest_path, model_fingerprint=fp_target) as f:
                manifest = json.loads(f.metadata["manifest"])
            maps = MapSet(store, manifest["parts"], fp_target)
            _restore(report, manifest, cached=True)
            report.cache = {"hit": True, "index": str(manifest_path), "files": maps.paths()}
            return BicoTransfer(ctx, report, manifest["layer_map"], maps, norm_rule)
        except (FileNotFoundError, KeyError, ValueError) as err:
            logger.warning("BiCo map cache %s unusable (%s); recomputing", manifest_path, err)

    manifest = _compute(ctx, calibration, store, key, fp_target, static_map, budget, device, progress, rtol, stats_path)
    maps = MapSet(store, manifest["parts"], fp_target)
    _restore(report, manifest, cached=False)
    report.cache = {"hit": False, "index": manifest["index_path"], "files": maps.paths()}
    return BicoTransfer(ctx, report, manifest["layer_map"], maps, norm_rule)


def _restore(report: TransferReport, manifest: dict[str, Any], *, cached: bool) -> None:
    report.layer_map = manifest["layer_map"]
    report.layer_map_rule = manifest["layer_map_rule"]
    report.similarity = manifest.get("similarity")
    report.block_update_size = manifest.get("block_update_size")
    report.spaces = manifest["spaces"]
    timings = manifest["timings"]
    if cached:
        report.timings.update({"statistics_s": 0.0, "maps_s": 0.0, "similarity_s": 0.0})
        report.extra["cached_run"] = {"timings": timings, "memory": manifest["memory"]}
        report.memory = {"peak_rss_bytes": peak_rss_bytes(), "statistics_bytes": 0, "passes": 0}
    else:
        report.timings.update(timings)
        report.memory = manifest["memory"]
    report.extra["calibration_tokens"] = manifest.get("tokens")
    for note in manifest.get("notes", []):
        report.note(note)


def _saved_part(store: Any, part_key: str, fingerprint: str) -> Optional[tuple[list[str], list[dict[str, Any]], int]]:
    """``(map names, report rows, statistics bytes)`` of a pass saved by an earlier run, or None."""
    path = store.lookup("bico_maps", part_key)
    if path is None:
        return None
    try:
        with store.open(path, model_fingerprint=fingerprint) as f:
            rows = json.loads(f.metadata["rows"])
            return sorted(f.keys()), rows, int(f.metadata["statistics_bytes"])
    except (KeyError, ValueError, CalibrationError) as err:   # older format or another model: recompute
        logger.warning("BiCo pass file %s unusable (%s); recomputing that pass", path, err)
        return None


def _compute(ctx, calibration, store, key, fp_target, static_map, budget, device, progress, rtol, stats_path) -> dict[str, Any]:
    cfg = ctx.cfg
    timings = {"load_s": 0.0, "similarity_s": 0.0, "statistics_s": 0.0, "maps_s": 0.0}
    notes: list[str] = []
    t0 = time.perf_counter()
    (model_a, model_b), batches, (loss_a, loss_b), _ = load_calibration([stats_path, ctx.target_path], calibration, device=device)
    timings["load_s"] = time.perf_counter() - t0
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    manifest: dict[str, Any] = {"tokens": tokens}
    if static_map is None:
        t0 = time.perf_counter()
        layer_map, sim, rel_a, rel_b = similarity_map(model_a, model_b, ctx, batches, device=device)
        timings["similarity_s"] = time.perf_counter() - t0
        manifest.update(layer_map_rule="similarity", similarity=sim.tolist(),
                        block_update_size={"source": rel_a, "target": rel_b})
    else:
        layer_map = static_map
        manifest["layer_map_rule"] = "explicit" if isinstance(cfg.layer_map, list) else cfg.layer_map
    manifest["layer_map"] = layer_map

    dims_a = ctx.arch_source.space_dims(ctx.shapes("source"), ctx.layers_source)
    dims_b = ctx.arch_target.space_dims(ctx.shapes("target"), ctx.layers_target)
    kinds = ctx.arch_target.space_kinds()
    out_stats = OUTPUT_STATS[cfg.output_space]
    pairs: list[PairSpec] = []
    for (layer_b, space), d_b in sorted(dims_b.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1])):
        layer_a = None if layer_b is None else layer_map[layer_b]
        if layer_b is not None and layer_a is None:
            continue
        d_a = dims_a.get((layer_a, space))
        kind = kinds.get((layer_b is not None, space))
        if d_a is None or kind is None:
            notes.append(f"space '{space}' of target block {layer_b} has no source counterpart; tensors using it are not transferred")
            continue
        for stat in (("X",) if kind in ("input", "hidden") else out_stats):
            pairs.append(PairSpec(layer_b, layer_a, space, stat, d_a, d_b))
    probes_a = ctx.arch_source.probes([n for n, _ in model_a.named_modules()], ctx.layers_source, out_stats)
    probes_b = ctx.arch_target.probes([n for n, _ in model_b.named_modules()], ctx.layers_target, out_stats)
    have_a = {(p.layer, p.space, p.stat) for p in probes_a}
    have_b = {(p.layer, p.space, p.stat) for p in probes_b}
    kept = []
    for p in pairs:
        if (p.source_layer, p.space, p.stat) in have_a and (p.target_layer, p.space, p.stat) in have_b:
            kept.append(p)
        else:
            notes.append(f"space '{p.space}' (target block {p.target_layer}) is not computed by the calibration models "
                         f"({type(model_b).__name__}); tensors using it are not transferred")
    pairs = kept
    tokens_per_batch = max(int(b["attention_mask"].sum()) for b in batches) if batches else 0
    passes = plan_passes(pairs, budget, tokens_per_batch, model=str(ctx.target_path))
    use_grad = cfg.output_space != "activations"
    parts: list[dict[str, Any]] = []
    spaces: list[dict[str, Any]] = []
    stats_peak = 0
    resumed = 0
    for k, group in enumerate(passes):
        layers = sorted({-1 if p.target_layer is None else p.target_layer for p in group})
        part_key = store.key("bico_maps", index=key, part=k, layers=layers)
        saved = _saved_part(store, part_key, fp_target)
        if saved is not None:               # this pass finished in an interrupted run: keep its maps
            names, rows, peak = saved
            parts.append({"key": part_key, "maps": names})
            spaces.extend(rows)
            stats_peak = max(stats_peak, peak)
            resumed += 1
            continue
        t0 = time.perf_counter()
        stats, peak = accumulate_pass(
            model_a=model_a, model_b=model_b, arch_a=ctx.arch_source, arch_b=ctx.arch_target,
            probes_a=probes_a, probes_b=probes_b, pairs=group, batches=batches,
            loss_a=loss_a if use_grad else None, loss_b=loss_b if use_grad else None,
            device=device, progress=progress, desc=f"BiCo statistics pass {k + 1}/{len(passes)}",
        )
        timings["statistics_s"] += time.perf_counter() - t0
        stats_peak = max(stats_peak, peak)
        t0 = time.perf_counter()
        maps, rows = fit_maps(stats, group, rtol=rtol, ties=ctx.arch_target.tied_spaces if cfg.tie_maps else (),
                               prior=cfg.identity_prior)
        del stats
        store.save("bico_maps", part_key, maps, {"model_fingerprint": fp_target, "model_path": str(ctx.target_path),
                                                 "index": key, "part": str(k), "rows": json.dumps(rows),
                                                 "statistics_bytes": str(peak)})
        parts.append({"key": part_key, "maps": sorted(maps)})
        spaces.extend(rows)
        del maps
        timings["maps_s"] += time.perf_counter() - t0
    if resumed:
        notes.append(f"{resumed} of {len(passes)} statistics passes were read back from an interrupted run "
                     "(their maps were saved when each pass finished)")
    memory = {
        "statistics_bytes": stats_peak,
        "passes": len(passes),
        "budget_bytes": budget,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        memory["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    manifest.update(parts=parts, spaces=spaces, timings=timings, memory=memory, notes=notes)
    del model_a, model_b
    path = store.save("bico_index", key, {"layer_map": torch.tensor([-1 if x is None else x for x in layer_map] or [0])},
                      {"model_fingerprint": fp_target, "model_path": str(ctx.target_path), "manifest": json.dumps(manifest)})
    manifest["index_path"] = str(path)
    return manifest


# ---------------------------------------------------------------------------------------------
# Deltas


class BicoTransfer(PreparedTransfer):
    method = "bico"

    def __init__(self, ctx: TransferContext, report: TransferReport, layer_map: list[Optional[int]], maps: MapSet, norm_rule: str):
        super().__init__(ctx, report, layer_map)
        self.maps = maps
        self.norm_rule = norm_rule
        self._fold: dict[tuple[Optional[int], Optional[int], str], bool] = {}

    # -- maps ---------------------------------------------------------------------------------
    def _map(self, layer: Optional[int], space: str) -> Optional[torch.Tensor]:
        """R (d_A, d_B) for the space, None for an identity space; Untransferable when unavailable."""
        if space in IDENTITY_SPACES:
            return None
        r = self.maps.get(layer, space)
        if r is None:
            where = "global" if layer is None else f"block {layer}"
            raise Untransferable(f"no statistics for space '{space}' ({where})")
        return r.to(self.compute_dtype)

    def _gain(self, layer: Optional[int], space: str) -> float:
        """``scale: norms``: the space's norm ratio (1 for ``none`` and for identity spaces)."""
        if self.ctx.cfg.scale != "norms" or space in IDENTITY_SPACES:
            return 1.0
        return self.maps.gain(layer, space)

    # -- norm folding -------------------------------------------------------------------------
    def _folded(self, i: Optional[int], j: Optional[int], norm_role: str) -> bool:
        key = (i, j, norm_role)
        if key in self._fold:
            return self._fold[key]
        result = self._decide_fold(i, j, norm_role)
        self._fold[key] = result
        return result

    def _decide_fold(self, i: Optional[int], j: Optional[int], norm_role: str) -> bool:
        if self.norm_rule != "fold":
            return False
        found = self.ctx.arch_target.rule_by_role(norm_role, j is not None)
        if found is None or not isinstance(found[1], NormRule) or not found[1].consumers:
            return False
        consumers = [c for c in found[1].consumers if (j, c, "weight") in self.ctx.index_target]
        if not consumers:
            return False
        for c in consumers:
            name = self.ctx.index_source.get((i, c, "weight"))
            if name is None or name not in self.ctx.ft_names:
                return False
        norm_name = self.ctx.index_source.get((i, norm_role, "norm"))
        if norm_name is None or norm_name not in self.ctx.ft_names:
            return False
        gain = self.ctx.source_base.get(norm_name, dtype=torch.float64)
        if not torch.isfinite(gain).all() or float(gain.abs().min()) <= FOLD_GAIN_RTOL * float(gain.abs().max()):
            self._report.note(f"norm '{norm_name}' has (near) zero gains: its delta is mapped diagonally, not folded")
            return False
        return True

    def _fold_terms(self, i: Optional[int], norm_role: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(g'/g, b' - (g'/g) b or None) of the source norm feeding a consumer."""
        g_name = self.ctx.index_source[(i, norm_role, "norm")]
        g, g_ft = self.read_pair(g_name)
        ratio = g_ft / g
        b_name = self.ctx.index_source.get((i, norm_role, "norm_bias"))
        shift = None
        if b_name is not None and b_name in self.ctx.ft_names:
            b, b_ft = self.read_pair(b_name)
            shift = b_ft - ratio * b
        return ratio, shift

    def _consumer_fold(self, spec: TensorSpec, i: Optional[int], j: Optional[int]) -> Optional[str]:
        norm_role = self.ctx.arch_target.norm_feeding(spec.role, j is not None)
        if norm_role is not None and self._folded(i, j, norm_role):
            return norm_role
        return None

    # -- per kind -----------------------------------------------------------------------------
    def _delta(self, name: str, spec: TensorSpec) -> Optional[torch.Tensor]:
        if spec.kind == "unknown":
            raise Untransferable(f"tensor role unknown for family {self.ctx.family}")
        i, j = self.source_layer(spec), spec.layer
        shape = tuple(self.ctx.target.shape(name))
        if spec.kind == "weight":
            return self._linear_weight(name, spec, i, j, shape)
        if spec.kind == "bias":
            return self._linear_bias(name, spec, i, j, shape)
        if spec.kind in ("norm", "norm_bias"):
            return self._norm(name, spec, i, j, shape)
        if spec.kind == "embedding":
            return self._embedding(name, spec, i, shape)
        if spec.kind == "vector":
            src = self._source(spec, i)
            a, f = self.read_pair(src)
            if tuple(a.shape) != shape:
                raise Untransferable(f"'{spec.in_space}' sizes differ (source {list(a.shape)}, target {list(shape)})")
            self._report.rule("identity (vocab-space vector)", name)
            return f - a
        raise Untransferable(f"no rule for tensor kind '{spec.kind}'")

    def _source(self, spec: TensorSpec, i: Optional[int]) -> str:
        src = self.ctx.source_name(spec, i)
        if src is None:
            where = "outside the blocks" if i is None else f"in source block {i}"
            raise Untransferable(f"no '{spec.role}' {spec.kind} {where} of the source models")
        return src

    def _linear_source(self, spec: TensorSpec, i: Optional[int]) -> str:
        src = self.ctx.source_name(spec, i)
        if src is None and spec.in_space is not None and spec.splits == ("vocab",):
            # tied source head: the source's output embedding is its token embedding
            for (layer, role, kind), name in self.ctx.index_source.items():
                s = self.ctx.source_specs[name]
                if kind == "embedding" and s.in_space == "vocab" and name in self.ctx.ft_names:
                    return name
        if src is None:
            return self._source(spec, i)
        return src

    def _out_in(self, t: torch.Tensor, rule: LinearRule) -> torch.Tensor:
        return t.T if rule.conv1d else t

    def _map_rows_cols(self, delta: torch.Tensor, rule: LinearRule, j: Optional[int], *, with_input: bool) -> torch.Tensor:
        """``R_out^T delta R_in`` per output split (delta in (out, in) layout; a vector when not ``with_input``)."""
        parts = len(rule.out_spaces)
        r_in = self._map(j, rule.in_space) if with_input else None
        if r_in is not None and r_in.shape[0] != delta.shape[1]:
            raise Untransferable(f"input map of '{rule.in_space}' is {list(r_in.shape)}, delta has {delta.shape[1]} inputs")
        if delta.shape[0] % parts:
            raise Untransferable(f"output size {delta.shape[0]} does not split into {parts} parts")
        size = delta.shape[0] // parts
        pieces = []
        for k, space in enumerate(rule.out_spaces):
            piece = delta[k * size:(k + 1) * size]
            r_out = self._map(j, space)
            if r_out is not None:
                if r_out.shape[0] != piece.shape[0]:
                    raise Untransferable(f"output map of '{space}' is {list(r_out.shape)}, delta has {piece.shape[0]} outputs")
                piece = r_out.T @ piece
            if r_in is not None:
                piece = piece @ r_in
            gain = self._gain(j, space) * (self._gain(j, rule.in_space) if with_input else 1.0)
            pieces.append(piece if gain == 1.0 else piece * gain)
        return torch.cat(pieces, dim=0)

    def _check_identity_sizes(self, out: torch.Tensor, shape: tuple[int, ...], rule: LinearRule) -> None:
        if tuple(out.shape) != shape:
            spaces = [s for s in (rule.in_space, *rule.out_spaces) if s in IDENTITY_SPACES]
            what = f"'{spaces[0]}' sizes differ" if spaces else "shapes differ"
            raise Untransferable(f"{what} (mapped source delta {list(out.shape)}, target {list(shape)})")

    def _linear_weight(self, name: str, spec: TensorSpec, i, j, shape) -> torch.Tensor:
        rule: LinearRule = spec.rule
        src = self._linear_source(spec, i)
        a, f = self.read_pair(src)
        a, f = self._out_in(a, rule), self._out_in(f, rule)
        norm_role = self._consumer_fold(spec, i, j)
        if norm_role is not None:
            ratio, _ = self._fold_terms(i, norm_role)
            f = f * ratio[None, :]
            self._report.rule("linear (norm gain folded in)", name)
        else:
            self._report.rule("linear", name)
        out = self._map_rows_cols(f - a, rule, j, with_input=True)
        target = (shape[1], shape[0]) if rule.conv1d else shape
        self._check_identity_sizes(out, target, rule)
        return out.T if rule.conv1d else out

    def _linear_bias(self, name: str, spec: TensorSpec, i, j, shape) -> torch.Tensor:
        rule: LinearRule = spec.rule
        src = self.ctx.source_name(spec, i)
        w_spec = TensorSpec(name, spec.family, spec.layer, spec.role, "weight", spec.module, rule=rule)
        w_src = self.ctx.source_name(w_spec, i)
        norm_role = self._consumer_fold(spec, i, j)
        delta: Optional[torch.Tensor] = None
        shifted = False
        if src is not None:
            a, f = self.read_pair(src)
            delta = f - a
        if norm_role is not None and w_src is not None:
            _, shift = self._fold_terms(i, norm_role)
            if shift is not None:
                w_ft = self._out_in(self.ctx.source_ft.get(w_src, dtype=self.compute_dtype), rule)
                term = w_ft @ shift
                delta = term if delta is None else delta + term
                shifted = True
        if delta is None:
            if w_src is None:
                raise Untransferable(f"no '{spec.role}' bias or weight in the source models")
            self._report.rule("zero (source has no bias)", name)
            return torch.zeros(shape, dtype=torch.float32)
        self._report.rule("bias (norm shift folded in)" if shifted else "bias", name)
        out = self._map_rows_cols(delta[:, None], rule, j, with_input=False)[:, 0]
        if tuple(out.shape) != shape:
            self._check_identity_sizes(out, shape, rule)
        return out

    def _norm(self, name: str, spec: TensorSpec, i, j, shape) -> torch.Tensor:
        rule: NormRule = spec.rule
        if self._folded(i, j, rule.role):
            self._report.rule("norm (folded into consumers: zero delta)", name)
            return torch.zeros(shape, dtype=torch.float32)
        src = self._source(spec, i)
        a, f = self.read_pair(src)
        r = self._map(j, rule.space)
        if r.shape[0] != a.shape[0]:
            raise Untransferable(f"map of '{rule.space}' is {list(r.shape)}, norm has {a.shape[0]} entries")
        if spec.kind == "norm":
            self._report.rule("norm (diagonal conjugation)", name)
            return (r * r).T @ (f - a)
        self._report.rule("norm bias (mapped as a vector)", name)
        return r.T @ (f - a)

    def _embedding(self, name: str, spec: TensorSpec, i, shape) -> torch.Tensor:
        src = self._source(spec, i)
        a, f = self.read_pair(src)
        if a.shape[0] != shape[0]:
            raise Untransferable(f"'{spec.in_space}' sizes differ (source {a.shape[0]} rows, target {shape[0]})")
        r = self._map(None, spec.out_space)
        if r.shape[0] != a.shape[1]:
            raise Untransferable(f"map of '{spec.out_space}' is {list(r.shape)}, embedding width is {a.shape[1]}")
        self._report.rule("embedding (hidden axis by output map)", name)
        gain = self._gain(None, spec.out_space)
        return (f - a) @ r if gain == 1.0 else ((f - a) @ r) * gain
