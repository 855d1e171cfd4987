"""Runs a :class:`~mergekit_bico.plan.Plan`: calibration/transfer preparation, then one job per
output tensor in the base model's storage order, streaming results into shards.

Memory: at any time the executor holds the inputs of the current job, its result, and the shard
being filled (``--out-shard-size``); peak memory does not grow with the model size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from tqdm.auto import tqdm

from mergekit_bico.config import MergeConfig
from mergekit_bico.errors import ConfigError, TensorMismatchError
from mergekit_bico.io.writer import ShardedWriter, atomic_output_dir, copy_support_files
from mergekit_bico.methods.registry import make_generator
from mergekit_bico.plan import Job, Plan, layer_of

log = logging.getLogger("mergekit_bico")


@dataclass
class RunOptions:
    out_shard_size: int = 5 * 1024**3
    device: str = "cpu"
    overwrite: bool = False
    copy_tokenizer: bool = True
    write_model_card: bool = True
    progress: bool = True
    cache_dir: Optional[Path] = None
    trust_remote_code: bool = False
    nan_policy: str = "error"  # error | warn


@dataclass
class RunResult:
    out_path: Path
    tensors: int
    bytes_written: int
    seconds: float
    reports: list[Path] = field(default_factory=list)


class Inputs:
    """Hands each job its input tensors (and any statistics) on the compute device."""

    def __init__(self, plan: Plan, options: RunOptions, compute_dtype: Optional[torch.dtype]):
        self.plan = plan
        self.options = options
        self.compute_dtype = compute_dtype
        self.transfers: list[Any] = []          # PreparedTransfer per plan.transfers index
        self.stats: dict[int, tuple[Any, float]] = {}   # entry index -> (Fisher stats file, its global norm)

    def statistic(self, entry: int, name: str) -> tuple[Optional[torch.Tensor], float]:
        """``(Fisher tensor or None, Fisher norm)`` of one input entry for output tensor ``name``."""
        stats, norm = self.stats[entry]
        tensor = stats.get(name) if name in stats else None
        return (tensor.to(self.options.device) if tensor is not None else None), norm

    def _read(self, model: str, tensor: str) -> torch.Tensor:
        t = self.plan.models[model].get(tensor, dtype=self.compute_dtype)
        if self.options.nan_policy != "ignore" and t.is_floating_point() and not torch.isfinite(t).all():
            msg = f"tensor '{tensor}' of model '{model}' contains NaN or Inf"
            if self.options.nan_policy == "error":
                raise TensorMismatchError(msg + " (pass --nan-policy warn to merge anyway)")
            log.warning(msg)
        return t.to(self.options.device)

    def load(self, job: Job) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        base = self._read(job.base.model, job.base.tensor) if job.base is not None else None
        tensors: list[torch.Tensor] = []
        for ref in job.inputs:
            if ref.transfer is None:
                tensors.append(self._read(ref.model, ref.tensor))
                continue
            target = base if base is not None else self._read(self.plan.base_path, job.name)
            delta = self.transfers[ref.transfer].delta(job.name)
            if delta is None:
                tensors.append(target.clone())
            else:
                tensors.append((target.float() + delta.to(self.options.device, torch.float32)).to(target.dtype))
        return tensors, base


def _merge_one(job: Job, inputs: Inputs) -> torch.Tensor:
    tensors, base = inputs.load(job)
    generator = None
    if job.seed is not None:
        # seeded by (seed, tensor name), on the CPU: masks depend on neither job order nor device
        generator = make_generator(job.seed, job.name, "cpu")
    kwargs: dict[str, Any] = {}
    if getattr(job.method, "needs_stats", False):
        kwargs["stats"] = [inputs.statistic(i, job.name) for i in job.entries]
    out = job.method.merge(
        tensors, base, job.model_params, job.global_params,
        tensor_name=job.name, generator=generator, **kwargs,
    )
    if tuple(out.shape) != tuple(job.shape) and job.method.name != "passthrough":
        raise TensorMismatchError(f"merge of '{job.name}' produced shape {list(out.shape)}, expected {list(job.shape)}")
    dtype = job.out_dtype or out.dtype  # out_dtype, else the computation dtype (as mergekit)
    return out.to("cpu", dtype)


def model_card(config_text: str, plan: Plan) -> str:
    inputs = "\n".join(f"- `{e.path}`" + (f" (transferred from `{e.transfer.source_base}` with {e.transfer.method})" if e.transfer else "") for e in plan.entries)
    base = f"`{plan.base_path}`" if plan.base_path else "none"
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergekit-bico\n- merge\n---\n"
        f"# Merged model\n\nThis model was made with [mergekit-bico](https://pypi.org/project/mergekit-bico/) "
        f"using the `{plan.method.name}` merge method.\n\n## Base model\n\n{base}\n\n## Models merged\n\n{inputs}\n\n"
        f"## Configuration\n\n```yaml\n{config_text.rstrip()}\n```\n"
    )


def _patch_config(out_dir: Path, plan: Plan, out_dtype: Optional[torch.dtype]) -> None:
    path = out_dir / "config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    if plan.out_num_layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                cfg[key] = plan.out_num_layers
        if isinstance(cfg.get("layer_types"), list):
            per_model: dict[str, list] = {}
            new_types = []
            for model, idx in plan.layer_sources:
                types = per_model.setdefault(model, plan.models[model].config_dict().get("layer_types") or [])
                new_types.append(types[idx] if idx < len(types) else cfg["layer_types"][0])
            cfg["layer_types"] = new_types
    if out_dtype is not None:
        name = str(out_dtype).replace("torch.", "")
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def run_plan(
    plan: Plan,
    out_path: Path,
    options: RunOptions,
    *,
    config_text: str,
    prepare: Optional[Callable[[Inputs], list[Any]]] = None,
) -> RunResult:
    """Prepare statistics/transfers, then stream every job's result into ``out_path`` atomically."""
    start = time.perf_counter()
    compute_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                     "float64": torch.float64}.get(plan.config.dtype or "")
    inputs = Inputs(plan, options, compute_dtype)
    extra_reports: list[Any] = prepare(inputs) if prepare else []
    order = _storage_order(plan)
    protected = [Path(p) for p in plan.models]
    with atomic_output_dir(out_path, overwrite=options.overwrite, protected=protected) as tmp:
        writer = ShardedWriter(tmp, options.out_shard_size, metadata={"format": "pt", "mergekit_bico": plan.method.name})
        bar = tqdm(order, desc="merging", unit="tensor", disable=not options.progress)
        for job in bar:
            bar.set_postfix_str(job.name[-40:], refresh=False)
            writer.add(job.name, _merge_one(job, inputs))
        writer.finish()
        ref = plan.base_path or plan.entries[0].path
        tok_src = None
        if plan.config.tokenizer_source not in (None, "base"):
            from mergekit_bico.plan import resolve_model_path
            tok_src = Path(resolve_model_path(plan.config.tokenizer_source, None))
        copy_support_files(Path(ref), tmp, tokenizer_source=tok_src if options.copy_tokenizer else None)
        if not options.copy_tokenizer:
            for f in tmp.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
                    f.unlink()
        _patch_config(tmp, plan, plan.jobs[0].out_dtype if plan.jobs else None)
        (tmp / "mergekit_config.yml").write_text(config_text if config_text.endswith("\n") else config_text + "\n")
        if options.write_model_card:
            (tmp / "README.md").write_text(model_card(config_text, plan))
        reports: list[Path] = []
        for i, rep in enumerate(extra_reports):
            for p in rep.write_report(tmp, f"transfer_report_{i}"):
                reports.append(out_path / p.name)
        bytes_written = writer.bytes_written
    return RunResult(out_path, len(order), bytes_written, time.perf_counter() - start, reports)


def _storage_order(plan: Plan) -> list[Job]:
    """Jobs sorted by where their first input lies on disk (shard, then offset), so reads stream."""
    ref = plan.models.get(plan.base_path or "") or plan.models[plan.entries[0].path]
    rank = {name: i for i, name in enumerate(ref.keys())}
    return sorted(plan.jobs, key=lambda j: (rank.get(j.inputs[0].tensor if j.inputs else j.name, len(rank)),
                                            (layer_of(j.name) or ("", -1, ""))[1]))


def config_yaml(config: MergeConfig) -> str:
    return yaml.safe_dump(config.model_dump(exclude_none=True, mode="json"), sort_keys=False)
