"""What the executor calls: :func:`prepare_transfer` -> :class:`PreparedTransfer`.

``prepared.delta(target_name)`` is the fine-tune's delta (``A' - A``) carried into the target's
coordinates for one target tensor (float32, the target tensor's shape), unscaled (the merge
applies the model's weight), or None when that tensor cannot be transferred (then the target's
value is kept and the reason is in the report). Source tensors are read lazily, one delta at a
time; only the maps (BiCo) or the target gradient file (GradFix) are prepared up front.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergekit_bico.architectures import ArchSpec, TensorSpec, arch_for_config, num_layers_from_config
from mergekit_bico.config import CalibrationConfig, TransferConfig
from mergekit_bico.errors import MergeKitBicoError, TransferError
from mergekit_bico.transfer.report import TransferReport

logger = logging.getLogger(__name__)

__all__ = ["prepare_transfer", "PreparedTransfer", "TransferContext", "Untransferable", "NORM_RULES"]

NORM_RULES = ("fold", "diagonal")
FLOAT64_MAX_NUMEL = 1 << 24  # deltas of larger tensors (embeddings, big MLPs) are mapped in float32


class Untransferable(Exception):
    """Internal: this tensor keeps the target's value; the message is the reason for the report."""


class TransferContext:
    """The three models (lazily), their family, block counts and per-role tensor indexes."""

    def __init__(self, cfg: TransferConfig, source_finetuned: Union[str, Path], target_base: Union[str, Path]):
        from mergekit_bico.io.loader import LazyModel

        self.cfg = cfg
        self.source_base_path = Path(cfg.source_base)
        self.source_ft_path = Path(source_finetuned)
        self.target_path = Path(target_base)
        self.source_base = LazyModel(self.source_base_path)
        self.source_ft = LazyModel(self.source_ft_path)
        self.target = LazyModel(self.target_path)
        self.arch_source: ArchSpec = arch_for_config(self.source_base.config_dict(), model=str(self.source_base_path))
        self.arch_ft: ArchSpec = arch_for_config(self.source_ft.config_dict(), model=str(self.source_ft_path))
        self.arch_target: ArchSpec = arch_for_config(self.target.config_dict(), model=str(self.target_path))
        if self.arch_ft.family != self.arch_source.family:
            raise TransferError(
                f"fine-tune '{self.source_ft_path}' is {self.arch_ft.family} but its source_base '{self.source_base_path}' "
                f"is {self.arch_source.family}"
            )
        if self.arch_target.family != self.arch_source.family:
            raise TransferError(
                f"cannot transfer from '{self.source_base_path}' ({self.arch_source.family}) to '{self.target_path}' "
                f"({self.arch_target.family}): source and target must be of the same family (llama/mistral/qwen2, gpt2 or bert)"
            )
        self.family = self.arch_target.family
        self.target_specs: dict[str, TensorSpec] = {n: self.arch_target.spec(n) for n in self.target.keys()}
        self.source_specs: dict[str, TensorSpec] = {n: self.arch_source.spec(n) for n in self.source_base.keys()}
        self.index_source = _role_index(self.source_specs)
        self.index_target = _role_index(self.target_specs)
        ft_names = set(self.source_ft.keys())
        for name in self.source_base.keys():
            if name in ft_names and tuple(self.source_base.shape(name)) != tuple(self.source_ft.shape(name)):
                raise TransferError(
                    f"tensor '{name}' is {list(self.source_ft.shape(name))} in fine-tune '{self.source_ft_path}' but "
                    f"{list(self.source_base.shape(name))} in its source_base '{self.source_base_path}'"
                )
        self.ft_names = ft_names
        self.source_names = set(self.source_base.keys())
        self.layers_source = _num_layers(self.source_base, self.source_specs)
        self.layers_target = _num_layers(self.target, self.target_specs)

    def source_name(self, spec: TensorSpec, source_layer: Optional[int]) -> Optional[str]:
        """Name of the source tensor with the same role (at ``source_layer``), present in A and A'."""
        name = self.index_source.get((source_layer, spec.role, spec.kind))
        if name is None or name not in self.ft_names:
            return None
        return name

    def shapes(self, which: str) -> dict[str, tuple[int, ...]]:
        model = {"source": self.source_base, "target": self.target, "finetuned": self.source_ft}[which]
        return {n: tuple(model.shape(n)) for n in model.keys()}

    def close(self) -> None:
        for m in (self.source_base, self.source_ft, self.target):
            try:
                m.close()
            except Exception:  # noqa: BLE001
                pass


def _role_index(specs: dict[str, TensorSpec]) -> dict[tuple[Optional[int], str, str], str]:
    index: dict[tuple[Optional[int], str, str], str] = {}
    for name, spec in specs.items():
        if spec.kind in ("unknown", "buffer"):
            continue
        index.setdefault((spec.layer, spec.role, spec.kind), name)
    return index


def _num_layers(model: Any, specs: dict[str, TensorSpec]) -> int:
    layers = [s.layer for s in specs.values() if s.layer is not None]
    if layers:
        return max(layers) + 1
    return num_layers_from_config(model.config_dict()) or 0


class PreparedTransfer:
    """A prepared transfer: ``delta(target_name)``, ``report()``, ``write_report(out_dir, stem)``."""

    method = "?"

    def __init__(self, ctx: TransferContext, report: TransferReport, layer_map: list[Optional[int]]):
        self.ctx = ctx
        self._report = report
        self.layer_map = layer_map
        self.compute_dtype = torch.float64
        self.calibration: Optional[CalibrationConfig] = None    # set by prepare_transfer

    # -- subclass hook ------------------------------------------------------------------------
    def _delta(self, name: str, spec: TensorSpec) -> Optional[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------
    def delta(self, target_name: str) -> Optional[torch.Tensor]:
        """float32 delta in the target's coordinates for ``target_name`` (the target tensor's shape), or None."""
        started = time.perf_counter()
        try:
            spec = self.ctx.target_specs.get(target_name)
            if spec is None:
                raise TransferError(f"tensor '{target_name}' is not in target model '{self.ctx.target_path}'")
            shape = tuple(self.ctx.target.shape(target_name))
            numel = 1
            for n in shape:
                numel *= n
            # float64 maths where it is cheap; float32 for the largest tensors (memory stays ~4 copies of one tensor)
            self.compute_dtype = torch.float64 if numel <= FLOAT64_MAX_NUMEL else torch.float32
            if spec.kind == "buffer":
                raise Untransferable("non-parameter buffer")
            if spec.layer is not None:
                if spec.layer >= len(self.layer_map):
                    raise Untransferable(f"block {spec.layer} is outside the layer map")
                if self.layer_map[spec.layer] is None:
                    self._report.rule("zero (no source block)", target_name)
                    if f"block {spec.layer}" not in self._report.zero_blocks:
                        self._report.zero_blocks.append(f"block {spec.layer}")
                    return torch.zeros(shape, dtype=torch.float32)
            out = self._delta(target_name, spec)
            if out is None:
                return None
            if tuple(out.shape) != shape:
                raise Untransferable(f"mapped delta has shape {list(out.shape)}, target tensor is {list(shape)}")
            if not torch.isfinite(out).all():
                raise TransferError(f"transfer of '{target_name}' to '{self.ctx.target_path}' produced NaN or Inf")
            return out.to(torch.float32).contiguous()
        except Untransferable as why:
            self._report.skip(target_name, str(why))
            logger.info("transfer: '%s' kept at the target's value: %s", target_name, why)
            return None
        finally:
            self._report.timings["deltas_s"] += time.perf_counter() - started

    def fingerprint(self) -> str:
        """Identity of the transferred model (target base + this delta): the three models' weight
        fingerprints, the transfer settings and the calibration data that fit it. Keys statistics
        computed at the transferred model (the Fisher of a transferred entry)."""
        import hashlib
        import json

        from mergekit_bico.calibration.data import data_fingerprint

        calib = self.calibration
        blob = json.dumps({
            "method": self.method,
            "source_base": self.ctx.source_base.fingerprint(),
            "source_finetuned": self.ctx.source_ft.fingerprint(),
            "target": self.ctx.target.fingerprint(),
            "transfer": self.ctx.cfg.model_dump(mode="json", exclude={"source_base", "calibration"}),
            "calibration": None if calib is None else {**calib.model_dump(mode="json", exclude={"data"}),
                                                       "data": data_fingerprint(calib)},
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def report(self) -> dict[str, Any]:
        return self._report.to_dict()

    def write_report(self, out_dir: Path, stem: str) -> list[Path]:
        return self._report.write(Path(out_dir), stem)

    # -- helpers shared by the methods --------------------------------------------------------
    def source_layer(self, spec: TensorSpec) -> Optional[int]:
        return None if spec.layer is None else self.layer_map[spec.layer]

    def read_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, A') in the compute dtype for one source tensor."""
        a = self.ctx.source_base.get(name, dtype=self.compute_dtype)
        f = self.ctx.source_ft.get(name, dtype=self.compute_dtype)
        return a, f


def resolve_layer_map(ctx: TransferContext) -> Optional[list[Optional[int]]]:
    from mergekit_bico.transfer.layermap import resolve_static

    return resolve_static(ctx.cfg.layer_map, ctx.layers_source, ctx.layers_target, model=str(ctx.target_path))


def prepare_transfer(
    *,
    cfg: TransferConfig,
    source_finetuned: Union[str, Path],
    target_base: Union[str, Path],
    calibration: Optional[CalibrationConfig],
    cache_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    norm_rule: str = "fold",
) -> PreparedTransfer:
    """Prepare the transfer of ``source_finetuned - cfg.source_base`` onto ``target_base``.

    ``bico`` and ``gradfix`` need ``calibration`` (statistics are cached in ``cache_dir``);
    ``naive`` needs it only for ``layer_map: similarity``. ``norm_rule`` (BiCo): ``fold`` (default)
    folds a norm's gain change into the linears that read it; ``diagonal`` maps it as a diagonal.
    """
    if norm_rule not in NORM_RULES:
        raise TransferError(f"unknown norm_rule '{norm_rule}' (use {', '.join(NORM_RULES)})")
    calibration = calibration or cfg.calibration
    if cfg.method in ("bico", "gradfix") and calibration is None:
        raise TransferError(
            f"transfer of '{source_finetuned}' with method '{cfg.method}' needs calibration data "
            "(a calibration: block in the transfer block, on the model entry or at the top level)"
        )
    if cfg.layer_map == "similarity" and calibration is None:
        raise TransferError(f"transfer of '{source_finetuned}': layer_map 'similarity' needs calibration data")
    ctx = TransferContext(cfg, source_finetuned, target_base)
    try:
        if cfg.method == "bico":
            from mergekit_bico.transfer.bico import prepare_bico

            prepared = prepare_bico(ctx, calibration, cache_dir=Path(cache_dir), device=device, progress=progress,
                                    norm_rule=norm_rule)
        else:
            from mergekit_bico.transfer.baselines import prepare_baseline

            prepared = prepare_baseline(ctx, calibration, cache_dir=Path(cache_dir), device=device, progress=progress)
        prepared.calibration = calibration
        return prepared
    except MergeKitBicoError:
        ctx.close()
        raise
