"""Baselines behind the same interface as BiCo.

* ``naive``: the delta copied as is (identity maps), after the layer map; every transferred tensor
  must have the same shape in source and target (TransferError otherwise, raised up front).
* ``gradfix`` (arXiv 2510.09658): the naive (layer-mapped) delta, keeping only the entries whose
  sign agrees with the negative mean gradient of the calibration loss at the target base:
  ``delta * [delta * (-mean_grad) > 0]``. Entries with a zero gradient carry no evidence and are
  dropped. The mean gradient is computed once per (target, data, settings) and cached.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mergekit_bico.architectures import LAYER_PATTERNS, TensorSpec
from mergekit_bico.calibration.covariance import peak_rss_bytes
from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import TransferError
from mergekit_bico.transfer.api import PreparedTransfer, TransferContext, Untransferable, resolve_layer_map
from mergekit_bico.transfer.report import TransferReport

logger = logging.getLogger(__name__)

__all__ = ["prepare_baseline", "NaiveTransfer", "GradFixTransfer", "mean_target_gradient"]

GRADFIX_VERSION = "gradfix-v1"


def _rename(name: str, family: str, new_index: int) -> str:
    pat = re.compile(LAYER_PATTERNS[family])
    m = pat.match(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(new_index) + name[m.end(1):]


class NaiveTransfer(PreparedTransfer):
    """``delta = A'[src] - A[src]`` with ``src`` the target name moved to the mapped source block."""

    method = "naive"

    def source_for(self, name: str, spec: TensorSpec) -> Optional[str]:
        if spec.layer is None:
            src = name
        else:
            i = self.layer_map[spec.layer]
            src = _rename(name, self.ctx.family, i)
        if src in self.ctx.ft_names and src in self.ctx.source_names:
            return src
        # prefix differences (a base model saved without its head prefix): fall back to the role index
        if spec.kind not in ("unknown", "buffer"):
            alt = self.ctx.source_name(spec, self.source_layer(spec))
            if alt is not None:
                return alt
        return None

    def check_shapes(self) -> None:
        """TransferError for the first target tensor whose source counterpart has another shape."""
        for name, spec in self.ctx.target_specs.items():
            if spec.kind == "buffer" or (spec.layer is not None and (spec.layer >= len(self.layer_map) or self.layer_map[spec.layer] is None)):
                continue
            src = self.source_for(name, spec)
            if src is None:
                continue
            a, b = tuple(self.ctx.source_base.shape(src)), tuple(self.ctx.target.shape(name))
            if a != b:
                raise TransferError(
                    f"{self.method} transfer needs equal shapes: '{name}' is {list(b)} in target '{self.ctx.target_path}' "
                    f"but '{src}' is {list(a)} in source '{self.ctx.source_base_path}' (use method: bico)"
                )

    def _naive(self, name: str, spec: TensorSpec) -> torch.Tensor:
        src = self.source_for(name, spec)
        if src is None:
            raise Untransferable("no tensor of that name in the source models")
        a, f = self.read_pair(src)
        return f - a

    def _delta(self, name: str, spec: TensorSpec) -> Optional[torch.Tensor]:
        self._report.rule("naive (identity)", name)
        return self._naive(name, spec)


class GradFixTransfer(NaiveTransfer):
    method = "gradfix"

    def __init__(self, ctx: TransferContext, report: TransferReport, layer_map: list[Optional[int]], grads: Any):
        super().__init__(ctx, report, layer_map)
        self.grads = grads
        self.kept = 0
        self.total = 0

    def _delta(self, name: str, spec: TensorSpec) -> Optional[torch.Tensor]:
        delta = self._naive(name, spec)
        if name not in self.grads:
            raise Untransferable("no calibration gradient for this tensor at the target (not a trained parameter)")
        grad = self.grads.get(name).to(torch.float64)
        keep = (delta * -grad) > 0
        self.kept += int(keep.sum())
        self.total += int((delta != 0).sum())
        self._report.extra["gradfix"] = {"kept_entries": self.kept, "nonzero_delta_entries": self.total,
                                         "kept_fraction": self.kept / self.total if self.total else None}
        self._report.rule("gradfix (sign-agreement mask)", name)
        return delta * keep


def mean_target_gradient(ctx: TransferContext, calibration: CalibrationConfig, store: Any, *, device: str, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Mean gradient of the calibration loss at the target base, per checkpoint tensor (cached)."""
    from mergekit_bico.calibration import data, losses, models
    from mergekit_bico.calibration.models import checkpoint_names, tokenizer_fingerprint

    fp = ctx.target.fingerprint()
    d = calibration.model_dump()
    d.pop("data", None)
    key = store.key("gradfix_grad", version=GRADFIX_VERSION, target=fp, data=data.data_fingerprint(calibration),
                    calibration=d, tokenizer=tokenizer_fingerprint(ctx.target_path))
    path = store.lookup("gradfix_grad", key)
    if path is not None:
        return path, {"hit": True}
    started = time.perf_counter()
    model_config = models.read_model_config(ctx.target_path)
    kind = losses.loss_kind(calibration, model_config)
    causal = kind == losses.CAUSAL_LM or (kind == losses.CUSTOM and losses.head_kind(model_config) == losses.CAUSAL_LM)
    samples = data.load_samples(calibration, need_labels=kind == losses.SEQUENCE_CLASSIFICATION)
    model, tok = models.load_model(ctx.target_path, calibration, device=device)
    batches = data.make_batches(samples, tok, calibration, causal_lm=causal)
    loss_fn = losses.resolve_loss(calibration, model)
    model.zero_grad(set_to_none=True)
    iterator: Any = enumerate(batches)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(batches), desc="GradFix gradient", leave=False)
    for n, batch in iterator:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_fn(model, batch, n).backward()
    names = checkpoint_names(model, ctx.target.keys())
    tensors: dict[str, torch.Tensor] = {}
    for pname, param in model.named_parameters():
        if param.grad is None:
            continue
        for ck in names.get(pname, []):
            tensors[ck] = (param.grad / max(len(batches), 1)).detach().float().cpu()
    path = store.save("gradfix_grad", key, tensors, {"model_fingerprint": fp, "model_path": str(ctx.target_path)})
    return path, {"hit": False, "statistics_s": time.perf_counter() - started}


def prepare_baseline(
    ctx: TransferContext,
    calibration: Optional[CalibrationConfig],
    *,
    cache_dir: Path,
    device: str = "cpu",
    progress: bool = True,
) -> PreparedTransfer:
    cfg = ctx.cfg
    report = TransferReport(
        method=cfg.method, family=ctx.family, source_base=str(ctx.source_base_path),
        source_finetuned=str(ctx.source_ft_path), target_base=str(ctx.target_path),
        settings={"layer_map": cfg.layer_map, "statistics": cfg.statistics},
        blocks={"source": ctx.layers_source, "target": ctx.layers_target},
    )
    layer_map = resolve_layer_map(ctx)
    report.layer_map_rule = "explicit" if isinstance(cfg.layer_map, list) else cfg.layer_map
    if layer_map is None:  # similarity
        from mergekit_bico.transfer.bico import load_calibration, similarity_map

        started = time.perf_counter()
        models_, batches, _, _ = load_calibration([ctx.source_base_path, ctx.target_path], calibration, device=device)
        layer_map, sim, rel_a, rel_b = similarity_map(models_[0], models_[1], ctx, batches, device=device)
        del models_
        report.similarity = sim.tolist()
        report.block_update_size = {"source": rel_a, "target": rel_b}
        report.timings["similarity_s"] = time.perf_counter() - started
    report.layer_map = layer_map
    if cfg.method == "naive":
        prepared: PreparedTransfer = NaiveTransfer(ctx, report, layer_map)
        prepared.check_shapes()
        report.memory = {"peak_rss_bytes": peak_rss_bytes()}
        return prepared
    if cfg.method != "gradfix":
        raise TransferError(f"unknown transfer method '{cfg.method}'")
    from mergekit_bico.calibration.store import StatsStore

    store = StatsStore(cache_dir)
    probe = NaiveTransfer(ctx, report, layer_map)
    probe.check_shapes()
    path, info = mean_target_gradient(ctx, calibration, store, device=device, progress=progress)
    report.timings["statistics_s"] = float(info.get("statistics_s", 0.0))
    report.cache = {"hit": info["hit"], "files": [str(path)]}
    report.memory = {"peak_rss_bytes": peak_rss_bytes()}
    grads = store.open(path, model_fingerprint=ctx.target.fingerprint())
    return GradFixTransfer(ctx, report, layer_map, grads)
