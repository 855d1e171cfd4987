"""The whole data path for one config: plan -> [calibrate] -> [transfer] -> merge -> write."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from mergekit_bico.calibration.store import CACHE_DIR_NAME as CACHE_NAME, default_cache_dir  # noqa: F401 (re-exported)
from mergekit_bico.config import MergeConfig
from mergekit_bico.errors import ConfigError
from mergekit_bico.executor import Inputs, RunOptions, RunResult, run_plan
from mergekit_bico.plan import Plan, build_plan

log = logging.getLogger("mergekit_bico")



def _needs_fisher(plan: Plan) -> bool:
    return bool(getattr(plan.method, "needs_stats", False))


def _check_fisher_calibration(plan: Plan) -> None:
    """Every entry of a Fisher merge has calibration data (checked before any transfer is prepared)."""
    if not _needs_fisher(plan):
        return
    for entry in plan.entries:
        if entry.calibration is None:
            raise ConfigError(
                f"{entry.label}: merge_method 'fisher' needs calibration data "
                "(a calibration: block on the model entry or at the top level)"
            )


def _prepare_fisher(plan: Plan, inputs: Inputs, cache_dir: Path, device: str, progress: bool) -> Iterator[str]:
    """The Fisher of every entry on its calibration data. A transferred entry stands for the target
    base plus its transferred delta, so its Fisher is taken there (in the target's shapes and
    names), never at the source fine-tune: run after :func:`_prepare_transfers` (and
    :func:`_check_fisher_calibration` before both)."""
    from mergekit_bico.calibration.fisher import compute_fisher, fisher_norm, shifted_fingerprint
    from mergekit_bico.calibration.store import StatsStore

    store = StatsStore(cache_dir)
    settings = plan.jobs[0].global_params if plan.jobs else {}
    common = dict(device=device, store=store, progress=progress,
                  estimator=settings.get("fisher_estimator", "expected"), lm_samples=settings.get("lm_samples", 1))
    for i, entry in enumerate(plan.entries):
        started = time.perf_counter()
        if entry.transfer is not None:
            prepared = inputs.transfers[entry.transfer_index]
            delta_fp = prepared.fingerprint()
            label = f"{Path(entry.path).name} transferred to {Path(plan.base_path).name}"
            path = compute_fisher(plan.base_path, entry.calibration, delta=prepared.delta, delta_fingerprint=delta_fp,
                                  label=label, **common)
            fingerprint = shifted_fingerprint(plan.models[plan.base_path].fingerprint(), delta_fp)
        else:
            path = compute_fisher(entry.path, entry.calibration, **common)
            fingerprint = plan.models[entry.path].fingerprint()
        stats = store.open(path, model_fingerprint=fingerprint)
        inputs.stats[i] = (stats, fisher_norm(stats))
        where = " (at its transfer onto the base)" if entry.transfer is not None else ""
        yield f"Fisher statistics for {entry.label}{where}: {path} ({time.perf_counter() - started:.1f} s)"


def _prepare_transfers(plan: Plan, inputs: Inputs, cache_dir: Path, device: str, progress: bool) -> tuple[list[Any], list[str]]:
    prepared: list[Any] = []
    lines: list[str] = []
    if not plan.transfers:
        return prepared, lines
    from mergekit_bico.transfer import prepare_transfer

    if plan.transfers and plan.base_path is None:
        raise ConfigError("a transfer: block needs base_model (the target base the delta is carried to)")
    for entry, tcfg, calib in plan.transfers:
        started = time.perf_counter()
        from mergekit_bico.plan import resolve_model_path

        tcfg = tcfg.model_copy(update={"source_base": resolve_model_path(tcfg.source_base, plan.config_dir)})
        prepared.append(
            prepare_transfer(
                cfg=tcfg, source_finetuned=entry.path, target_base=plan.base_path, calibration=calib,
                cache_dir=cache_dir, device=device, progress=progress,
            )
        )
        lines.append(f"transfer ({tcfg.method}) prepared for {entry.label} in {time.perf_counter() - started:.1f} s")
    inputs.transfers = prepared
    return prepared, lines


def run_merge(
    config: MergeConfig,
    config_path: Optional[Path],
    out_path: Path,
    options: RunOptions,
    *,
    random_seed: int = 0,
    config_text: Optional[str] = None,
) -> RunResult:
    """Plan, prepare statistics (cached), merge and write ``out_path`` atomically."""
    config_dir = config_path.parent if config_path else None
    plan = build_plan(config, config_dir=config_dir, random_seed=random_seed)
    if config_text is None:
        config_text = config_path.read_text() if config_path else ""
    cache_dir = options.cache_dir or default_cache_dir(out_path)

    def prepare(inputs: Inputs) -> list[Any]:
        _check_fisher_calibration(plan)
        prepared, lines = _prepare_transfers(plan, inputs, cache_dir, options.device, options.progress)
        for line in lines:
            log.info(line)
        if _needs_fisher(plan):             # after the transfers: a transferred entry's Fisher is taken at it
            for line in _prepare_fisher(plan, inputs, cache_dir, options.device, options.progress):
                log.info(line)
        return prepared

    return run_plan(plan, out_path, options, config_text=config_text, prepare=prepare)


def calibrate_only(config: MergeConfig, config_path: Path, cache_dir: Path, *, device: str, progress: bool) -> Iterator[str]:
    """Compute (or find cached) every statistic ``config`` needs; yields one line per item."""
    plan = build_plan(config, config_dir=config_path.parent)
    inputs = Inputs(plan, RunOptions(device=device, progress=progress), None)
    _check_fisher_calibration(plan)
    _, lines = _prepare_transfers(plan, inputs, cache_dir, device, progress)
    yield from lines
    if _needs_fisher(plan):
        yield from _prepare_fisher(plan, inputs, cache_dir, device, progress)
    if not _needs_fisher(plan) and not plan.transfers:
        yield f"nothing to calibrate: merge_method '{plan.method.name}' uses no statistics and no model has a transfer: block"
