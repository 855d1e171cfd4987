"""Planning: one job per output tensor (which input tensors, resolved parameters, which method).

Nothing is loaded here but safetensors headers: the plan is cheap and catches every structural
error (missing tensor, shape mismatch, missing parameter, bad value) before any work starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergekit_bico.dtypes import torch, torch_dtype

from mergekit_bico.config import CalibrationConfig, MergeConfig, TransferConfig
from mergekit_bico.errors import ConfigError, TensorMismatchError
from mergekit_bico.io.loader import LazyModel
from mergekit_bico.methods import get_method
from mergekit_bico.methods.registry import MergeMethod, ParamSpec
from mergekit_bico.params import check_gradients, check_known, finite, is_set, resolve

LAYER_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|layer|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

#: the config's ``dtype`` / ``out_dtype`` values (torch's names of the merge dtypes)
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def layer_of(name: str) -> Optional[tuple[str, int, str]]:
    """``model.layers.3.mlp.up_proj.weight`` -> ``("model.layers", 3, "mlp.up_proj.weight")``."""
    m = LAYER_RE.match(name)
    if not m:
        return None
    return m.group("prefix"), int(m.group("idx")), m.group("rest")


def rename_layer(name: str, new_index: int) -> str:
    parts = layer_of(name)
    if parts is None:
        return name
    return f"{parts[0]}.{new_index}.{parts[2]}"


def num_layers(model: LazyModel) -> int:
    """Number of transformer blocks: from config.json, else from the tensor names."""
    cfg = model.config_dict()
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    indices = [p[1] for p in (layer_of(n) for n in model.keys()) if p]
    return max(indices) + 1 if indices else 0


# ---------------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One input of the merge: a model (or slice source) with its parameter levels."""

    label: str                      # e.g. "models[1] ('./ft')" for messages
    path: str                       # resolved model folder
    levels: list[Optional[dict]]    # parameter dicts, highest precedence first (entry, slice, global)
    transfer: Optional[TransferConfig] = None
    transfer_index: Optional[int] = None
    calibration: Optional[CalibrationConfig] = None


@dataclass
class InputRef:
    """Where one job input comes from: a model's tensor, or a transferred delta added to the base."""

    model: str
    tensor: str
    transfer: Optional[int] = None


@dataclass
class Job:
    name: str
    shape: tuple[int, ...]
    method: MergeMethod
    inputs: list[InputRef]
    base: Optional[InputRef]
    model_params: list[dict[str, Any]]
    global_params: dict[str, Any]
    entries: list[int]              # index into Plan.entries of each input (for statistics look-ups)
    out_dtype_name: Optional[str]     # "bfloat16", ...: out_dtype, else dtype, of the config
    seed: Optional[int] = None

    @property
    def out_dtype(self) -> Optional[torch.dtype]:
        return torch_dtype(self.out_dtype_name) if self.out_dtype_name else None

    def describe(self) -> str:
        ins = ", ".join(
            (f"transfer#{i.transfer}({i.tensor})" if i.transfer is not None else f"{Path(i.model).name}:{i.tensor}")
            for i in self.inputs
        )
        base = f" base={Path(self.base.model).name}:{self.base.tensor}" if self.base else ""
        params = {k: v for k, v in self.global_params.items()}
        mp = [dict(p) for p in self.model_params]
        return f"{self.name} {list(self.shape)} <- {self.method.name}[{ins}]{base} global={params} per_model={mp}"


@dataclass
class Plan:
    config: MergeConfig
    method: MergeMethod
    base_path: Optional[str]
    entries: list[ModelEntry]
    jobs: list[Job]
    models: dict[str, LazyModel]
    transfers: list[tuple[ModelEntry, TransferConfig, Optional[CalibrationConfig]]]
    out_num_layers: Optional[int] = None
    layer_sources: list[tuple[str, int]] = field(default_factory=list)
    config_dir: Optional[Path] = None

    def input_bytes(self) -> int:
        return sum(self.models[p].nbytes(n) for p in self.models for n in self.models[p].keys())


def resolve_model_path(ref: str, config_dir: Optional[Path]) -> str:
    """A model reference is a local folder: as given (relative to the working directory), else
    relative to the config file's folder. Hub ids are not fetched (no network)."""
    p = Path(os.path.expanduser(ref))
    if p.exists() or p.is_absolute() or config_dir is None:
        return str(p)
    alt = config_dir / p
    if alt.exists():
        return str(alt)
    return str(p)


class Planner:
    def __init__(
        self,
        config: MergeConfig,
        *,
        config_dir: Optional[Path] = None,
        random_seed: int = 0,
    ) -> None:
        self.config = config
        self.config_dir = config_dir
        self.random_seed = random_seed
        self.method = get_method(config.merge_method)
        self.models: dict[str, LazyModel] = {}
        self.entries: list[ModelEntry] = []
        self.transfers: list[tuple[ModelEntry, TransferConfig, Optional[CalibrationConfig]]] = []
        self.out_dtype = config.out_dtype or config.dtype or None

    # -- models --------------------------------------------------------------------------------
    def model(self, ref: str) -> LazyModel:
        path = resolve_model_path(ref, self.config_dir)
        if path not in self.models:
            self.models[path] = LazyModel(path)
        return self.models[path]

    def path(self, ref: str) -> str:
        return resolve_model_path(ref, self.config_dir)

    def calibration(self, *choices: Optional[CalibrationConfig]) -> Optional[CalibrationConfig]:
        """The first calibration block given, its ``data`` path resolved like a model path."""
        for c in choices:
            if c is not None:
                return c.model_copy(update={"data": self.path(c.data)})
        return None

    # -- parameters ----------------------------------------------------------------------------
    def _known_params(self) -> set[str]:
        names = {p.name for p in self.method.params}
        if self.method.name == "bico":
            names.add("source_base")
        return names

    def _check_param_names(self) -> None:
        known = self._known_params()
        cfg = self.config
        check_known((cfg.parameters or {}).keys(), known, method=self.method.name, where="global parameters")
        for i, m in enumerate(cfg.models or []):
            check_known((m.parameters or {}).keys(), known, method=self.method.name, where=f"models[{i}] ('{m.model}')")
        for i, s in enumerate(cfg.slices or []):
            check_known((s.parameters or {}).keys(), known, method=self.method.name, where=f"slices[{i}]")
            for j, src in enumerate(s.sources):
                check_known(
                    (src.parameters or {}).keys(), known, method=self.method.name,
                    where=f"slices[{i}].sources[{j}] ('{src.model}')",
                )

    def _resolve(self, spec: ParamSpec, levels: list[Optional[dict]], tensor: str, t: float, where: str) -> Any:
        def convert(v: Any) -> Any:
            return self.method.validate_value(spec, v, where=f"in {where} on '{tensor}'")

        value = resolve(spec.name, convert, levels, tensor_name=tensor, t=t)
        if not is_set(value):
            if spec.required:
                raise ConfigError(
                    f"missing required parameter '{spec.name}' for merge_method '{self.method.name}' "
                    f"in {where} (tensor '{tensor}')"
                )
            value = spec.default
        if value is not None and not finite(value):
            raise ConfigError(f"parameter '{spec.name}' in {where} on '{tensor}' is {value}; it must be finite")
        return self.method.validate_value(spec, value, where=f"in {where} on '{tensor}'")

    def _model_params(self, entry: ModelEntry, tensor: str, t: float) -> dict[str, Any]:
        return {
            spec.name: self._resolve(spec, entry.levels, tensor, t, entry.label)
            for spec in self.method.params
            if spec.scope == "model"
        }

    def _global_params(self, levels: list[Optional[dict]], tensor: str, t: float) -> dict[str, Any]:
        return {
            spec.name: self._resolve(spec, levels, tensor, t, "global parameters")
            for spec in self.method.params
            if spec.scope == "global"
        }

    # -- entries -------------------------------------------------------------------------------
    def _entry_for_model(self, i: int, m: Any) -> ModelEntry:
        cfg = self.config
        path = self.path(m.model)
        transfer = m.transfer
        params = dict(m.parameters or {})
        if self.method.name == "bico":
            src = params.pop("source_base", None)
            if transfer is None:
                if not isinstance(src, str):
                    raise ConfigError(
                        f"models[{i}] ('{m.model}'): merge_method 'bico' needs parameters.source_base "
                        "(the old base model this fine-tune was trained from) or a transfer: block"
                    )
                transfer = TransferConfig(method="bico", source_base=src)
            elif src is not None:
                raise ConfigError(f"models[{i}] ('{m.model}'): give source_base in parameters or in transfer:, not both")
        entry = ModelEntry(
            label=f"models[{i}] ('{m.model}')",
            path=path,
            levels=[params, cfg.parameters],
            transfer=transfer,
            calibration=self.calibration(m.calibration, cfg.calibration),
        )
        if transfer is not None:
            calib = self.calibration(transfer.calibration, m.calibration, cfg.calibration)
            entry.transfer_index = len(self.transfers)
            self.transfers.append((entry, transfer, calib))
        return entry

    # -- planning ------------------------------------------------------------------------------
    def plan(self) -> Plan:
        self._check_param_names()
        for ref in self.config.referenced_models():
            self.model(ref)
        if self.config.tokenizer_source not in (None, "base"):
            if self.config.tokenizer_source == "union":
                raise ConfigError(
                    "tokenizer_source: 'union' is not supported (it needs vocabulary surgery); "
                    "use 'base' or a model path"
                )
            tok = Path(self.path(self.config.tokenizer_source))
            if not tok.is_dir():
                raise ConfigError(f"tokenizer_source '{self.config.tokenizer_source}' is not a model folder")
            from mergekit_bico.io.writer import TOKENIZER_FILES

            if not any((tok / name).is_file() for name in TOKENIZER_FILES):
                raise ConfigError(
                    f"tokenizer_source '{self.config.tokenizer_source}' has no tokenizer files "
                    f"(none of {', '.join(TOKENIZER_FILES[:3])}, ...)"
                )
        plan = self._plan_slices() if self.config.slices else self._plan_models()
        self._check_support_files(plan)
        return plan

    def _check_support_files(self, plan: "Plan") -> None:
        """The config / tokenizer files the executor will copy are checked now, not after the merge."""
        from mergekit_bico.io.writer import support_files

        ref = plan.base_path or (plan.entries[0].path if plan.entries else None)
        if ref is None:
            return
        tok = self.config.tokenizer_source
        support_files(Path(ref), tokenizer_source=Path(self.path(tok)) if tok not in (None, "base") else None)

    def _base_role_check(self, base_path: Optional[str]) -> None:
        if self.method.base == "required" and base_path is None:
            raise ConfigError(f"merge_method '{self.method.name}' needs a base_model")

    def _plan_models(self) -> Plan:
        cfg = self.config
        base_path = self.path(cfg.base_model) if cfg.base_model else None
        self._base_role_check(base_path)
        all_entries = [self._entry_for_model(i, m) for i, m in enumerate(cfg.models or [])]
        # Which entries feed the method. Methods built on task vectors skip an entry that *is* the
        # base (its delta is zero and mergekit leaves its weight out of the sums).
        entries = [
            e for e in all_entries
            if not (self.method.base in ("required", "optional") and base_path is not None
                    and e.transfer is None and os.path.realpath(e.path) == os.path.realpath(base_path))
        ]
        if self.method.base == "none" and base_path is not None and not any(
            os.path.realpath(e.path) == os.path.realpath(base_path) for e in entries
        ):
            # mergekit adds a base model that is not listed as one more input of the merge
            entries.append(ModelEntry(label=f"base_model ('{cfg.base_model}')", path=base_path, levels=[None, cfg.parameters]))
        if not entries:
            raise ConfigError("nothing to merge: every model entry is the base model")
        self.entries = entries
        ref_path = base_path or entries[0].path
        ref = self.models[ref_path]
        n_layers = num_layers(ref)
        span = f"model '{ref_path}'"
        check_gradients(cfg.parameters, layers=n_layers, where="global parameters", span=span)
        for e in all_entries:
            check_gradients(e.levels[0], layers=n_layers, where=e.label, span=span)
        jobs: list[Job] = []
        for name in ref.keys():
            parts = layer_of(name)
            t = (parts[1] / (n_layers - 1) if n_layers > 1 else 1.0) if parts else 0.0
            jobs.append(self._job(name, name, entries, list(range(len(entries))), base_path, ref_path, t, [None, cfg.parameters]))
        return Plan(cfg, self.method, base_path, entries, jobs, self.models, self.transfers)

    def _job(
        self,
        out_name: str,
        in_name: str,
        entries: list[ModelEntry],
        entry_ids: list[int],
        base_path: Optional[str],
        ref_path: str,
        t: float,
        global_levels: list[Optional[dict]],
        entry_names: Optional[list[str]] = None,
    ) -> Job:
        ref = self.models[ref_path]
        shape = ref.shape(in_name)
        inputs: list[InputRef] = []
        params: list[dict[str, Any]] = []
        for k, e in enumerate(entries):
            tensor = entry_names[k] if entry_names else in_name
            if e.transfer is not None:
                inputs.append(InputRef(model=e.path, tensor=out_name, transfer=e.transfer_index))
            else:
                model = self.models[e.path]
                if tensor not in model:
                    raise TensorMismatchError(
                        f"model '{e.path}' has no tensor '{tensor}' (needed for output tensor '{out_name}', "
                        f"present in '{ref_path}')"
                    )
                if model.shape(tensor) != shape and self.method.name != "passthrough":
                    raise TensorMismatchError(
                        f"shape mismatch on '{tensor}': {list(model.shape(tensor))} in '{e.path}' vs "
                        f"{list(shape)} in '{ref_path}' (merge_method '{self.method.name}' needs equal shapes; "
                        "use a transfer: block to move a delta between models of different shapes)"
                    )
                inputs.append(InputRef(model=e.path, tensor=tensor))
            params.append(self._model_params(e, out_name, t))
        base = None
        if base_path is not None and self.method.base != "none":
            bmodel = self.models[base_path]
            if in_name not in bmodel:
                raise TensorMismatchError(f"base model '{base_path}' has no tensor '{in_name}'")
            if bmodel.shape(in_name) != shape:
                raise TensorMismatchError(
                    f"shape mismatch on '{in_name}': {list(bmodel.shape(in_name))} in base model '{base_path}' "
                    f"vs {list(shape)} in '{ref_path}'"
                )
            base = InputRef(model=base_path, tensor=in_name)
        seed = self.random_seed if self.method.uses_rng else None
        global_params = self._global_params(global_levels, out_name, t)
        # the method's own cross-parameter checks (e.g. weights summing to 0), now rather than mid-merge
        self.method.resolve(params, global_params, tensor_name=out_name)
        return Job(
            name=out_name,
            shape=tuple(shape),
            method=self.method,
            inputs=inputs,
            base=base,
            model_params=params,
            global_params=global_params,
            entries=entry_ids,
            out_dtype_name=self.out_dtype,
            seed=seed,
        )

    def _plan_slices(self) -> Plan:
        cfg = self.config
        slices = cfg.slices or []
        for i, s in enumerate(slices):
            for j, src in enumerate(s.sources):
                model = self.model(src.model)
                n = num_layers(model)
                if src.layer_range[1] > n:
                    raise ConfigError(
                        f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} is outside model "
                        f"'{src.model}', which has {n} layers"
                    )
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) != 1:
                raise ConfigError(f"slices[{i}]: all sources must span the same number of layers, got {sorted(lengths)}")
            (length,) = lengths
            span = f"slices[{i}]"
            check_gradients(cfg.parameters, layers=length, where="global parameters", span=span)
            check_gradients(s.parameters, layers=length, where=f"slices[{i}]", span=span)
            for j, src in enumerate(s.sources):
                check_gradients(src.parameters, layers=length, where=f"slices[{i}].sources[{j}] ('{src.model}')", span=span)
        jobs: list[Job] = []
        entries: list[ModelEntry] = []
        out_layer = 0
        layer_sources: list[tuple[str, int]] = []

        def slice_entries(i: int) -> tuple[list[ModelEntry], list[int], Optional[str]]:
            s = slices[i]
            base_ref = s.base_model or cfg.base_model
            base_path = self.path(base_ref) if base_ref else None
            ids = []
            chosen = []
            for j, src in enumerate(s.sources):
                e = ModelEntry(
                    label=f"slices[{i}].sources[{j}] ('{src.model}')",
                    path=self.path(src.model),
                    levels=[src.parameters, s.parameters, cfg.parameters],
                )
                if self.method.base in ("required", "optional") and base_path and os.path.realpath(e.path) == os.path.realpath(base_path):
                    continue
                ids.append(len(entries))
                entries.append(e)
                chosen.append(e)
            if self.method.base == "required" and base_path is None:
                raise ConfigError(f"merge_method '{self.method.name}' needs a base_model (slices[{i}])")
            if not chosen:
                raise ConfigError(f"slices[{i}]: nothing to merge (every source is the base model)")
            return chosen, ids, base_path

        per_slice = [slice_entries(i) for i in range(len(slices))]
        first_src = slices[0].sources[0]
        last_src = slices[-1].sources[0]
        first_model = self.models[self.path(first_src.model)]
        last_model = self.models[self.path(last_src.model)]
        non_layer_first = [n for n in first_model.keys() if layer_of(n) is None]
        pre = [n for n in non_layer_first if any(h in n for h in PRE_HINTS)]
        post = [n for n in last_model.keys() if layer_of(n) is None and not any(h in n for h in PRE_HINTS)]

        def plan_non_layer(names: list[str], which: int) -> None:
            chosen, ids, base_path = per_slice[which]
            s = slices[which]
            ref_path = chosen[0].path
            for name in names:
                jobs.append(self._job(name, name, chosen, ids, base_path, ref_path, 0.0, [s.parameters, cfg.parameters]))

        plan_non_layer(pre, 0)
        for i, s in enumerate(slices):
            chosen, ids, base_path = per_slice[i]
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            src_by_entry = [src for src in s.sources if not (
                self.method.base in ("required", "optional") and base_path
                and os.path.realpath(self.path(src.model)) == os.path.realpath(base_path))]
            ref_model = self.models[chosen[0].path]
            for k in range(length):
                t = k / (length - 1) if length > 1 else 1.0
                ref_layer = src_by_entry[0].layer_range[0] + k
                layer_sources.append((chosen[0].path, ref_layer))
                layer_names = [n for n in ref_model.keys() if (p := layer_of(n)) and p[1] == ref_layer]
                for name in layer_names:
                    out_name = rename_layer(name, out_layer)
                    in_names = [rename_layer(name, src.layer_range[0] + k) for src in src_by_entry]
                    base_name = rename_layer(name, s.sources[0].layer_range[0] + k)
                    jobs.append(self._slice_job(out_name, base_name, in_names, chosen, ids, base_path, t, s))
                out_layer += 1
        plan_non_layer(post, len(slices) - 1)
        self.entries = entries
        return Plan(
            cfg, self.method, self.path(cfg.base_model) if cfg.base_model else None,
            entries, jobs, self.models, self.transfers, out_num_layers=out_layer, layer_sources=layer_sources,
        )

    def _slice_job(self, out_name, base_name, in_names, chosen, ids, base_path, t, s) -> Job:
        ref_path = chosen[0].path
        job = self._job(
            out_name, in_names[0], chosen, ids, base_path if (base_path and base_name in self.models[base_path]) else None,
            ref_path, t, [s.parameters, self.config.parameters], entry_names=in_names,
        )
        if job.base is not None:
            job.base = InputRef(model=base_path, tensor=base_name)
        elif base_path is not None and self.method.base == "required":
            raise TensorMismatchError(f"base model '{base_path}' has no tensor '{base_name}'")
        return job


def build_plan(config: MergeConfig, *, config_dir: Optional[Path] = None, random_seed: int = 0) -> Plan:
    """Validate the config against the models on disk and return the per-tensor jobs."""
    plan = Planner(config, config_dir=config_dir, random_seed=random_seed).plan()
    plan.config_dir = config_dir
    return plan


def plan_summary(plan: Plan) -> str:
    lines = [
        f"merge_method: {plan.method.name}",
        f"base_model: {plan.base_path}",
        "inputs: " + ", ".join(e.label for e in plan.entries),
        f"jobs: {len(plan.jobs)} output tensors",
    ]
    for entry, tcfg, calib in plan.transfers:
        lines.append(
            f"transfer: {entry.label} via {tcfg.method} from source_base '{tcfg.source_base}'"
            + (f" (calibration: {calib.data}, {calib.samples} samples)" if calib else "")
        )
    lines.extend("  " + job.describe() for job in plan.jobs)
    return "\n".join(lines)


def json_dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
