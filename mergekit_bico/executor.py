"""Runs a :class:`~mergekit_bico.plan.Plan`: calibration/transfer preparation, then one job per
output tensor in the base model's storage order, streaming results into shards.

Memory: the output layout (names, dtypes, shapes) is known from the input headers, so every result
goes straight to its place in its shard file (:class:`StreamingShardedWriter`); nothing is buffered.
Tensors above ``CHUNK_ELEMENTS`` (``ELEMENTWISE_SLICE`` for elementwise methods) are read, merged
and written in flat slices when the method allows it (task_arithmetic, linear; ties in three
passes), so the working set -- and the peak RSS -- does not grow with the model or tensor size.
Other methods hold one tensor's inputs and result at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mergekit_bico.dtypes import FLOATING, NUMPY_METHODS, name_of, promote, torch, torch_dtype
import yaml
from tqdm.auto import tqdm

from mergekit_bico.config import MergeConfig
from mergekit_bico.errors import TensorMismatchError
from mergekit_bico.io.writer import ShardedWriter, StreamingShardedWriter, atomic_output_dir, copy_support_files
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

    def __init__(self, plan: Plan, options: RunOptions, compute_dtype: Optional[str | torch.dtype]):
        self.plan = plan
        self.options = options
        #: the config's ``dtype`` (a name), None: each job's inputs' promotion
        self.compute_name: Optional[str] = name_of(compute_dtype) if compute_dtype is not None else None
        self.transfers: list[Any] = []          # PreparedTransfer per plan.transfers index
        self.stats: dict[int, tuple[Any, float]] = {}   # entry index -> (Fisher stats file, its global norm)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return torch_dtype(self.compute_name) if self.compute_name else None

    def statistic(self, entry: int, name: str) -> tuple[Optional[torch.Tensor], float]:
        """``(Fisher tensor or None, Fisher norm)`` of one input entry for output tensor ``name``."""
        stats, norm = self.stats[entry]
        tensor = stats.get(name) if name in stats else None
        return (tensor.to(self.options.device) if tensor is not None else None), norm

    def _read(self, model: str, tensor: str) -> torch.Tensor:
        t = self.plan.models[model].get(tensor, dtype=self.compute_dtype)
        self._check_finite(t, model, tensor)
        return t.to(self.options.device)

    def _check_finite(self, t: torch.Tensor, model: str, tensor: str) -> None:
        """Apply ``--nan-policy`` to an input tensor (or a slice of one)."""
        if self.options.nan_policy != "ignore" and _has_nonfinite(t):
            self.nonfinite(model, tensor)

    def nonfinite(self, model: str, tensor: str) -> None:
        """``--nan-policy`` for an input found to hold NaN or Inf: raise, or warn."""
        msg = f"tensor '{tensor}' of model '{model}' contains NaN or Inf"
        if self.options.nan_policy == "error":
            raise TensorMismatchError(msg + " (pass --nan-policy warn to merge anyway)")
        log.warning(msg)

    def _read_flat(self, model: str, tensor: str, a: int, b: int, check: bool) -> torch.Tensor:
        t = self.plan.models[model].get_flat(tensor, a, b, dtype=self.compute_dtype)
        if check:
            self._check_finite(t, model, tensor)
        return t

    def load_flat(self, job: Job, a: int, b: int, check: bool = True) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Elements a:b of every input of ``job`` (flattened); no transfers (see ``_chunk_kind``)."""
        base = self._read_flat(job.base.model, job.base.tensor, a, b, check) if job.base is not None else None
        return [self._read_flat(ref.model, ref.tensor, a, b, check) for ref in job.inputs], base

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


#: Tensors with more elements than this are merged in flat slices of this many elements (16 MiB of
#: float32 per input), when the method allows: the working set, hence the peak RSS, then does not
#: depend on the model's size, and the slices' buffers are reused by the allocator instead of
#: being fresh (page-faulted, zeroed) memory every time.
CHUNK_ELEMENTS = 4 << 20
#: Elementwise methods (no pass over the whole tensor) use small slices: their few arithmetic
#: passes then run on data in the CPU caches.
ELEMENTWISE_SLICE = 512 << 10
_ELEMENTWISE = {"task_arithmetic", "linear"}


def _chunk_kind(job: Job, options: RunOptions) -> Optional[str]:
    """'elementwise' or 'ties' when ``job`` can be merged in flat slices, else None."""
    if options.device != "cpu":
        return None
    numel = math.prod(job.shape)
    if numel <= min(CHUNK_ELEMENTS, ELEMENTWISE_SLICE):
        return None
    if job.seed is not None or getattr(job.method, "needs_stats", False):
        return None
    if any(ref.transfer is not None for ref in job.inputs):
        return None
    if job.method.name in _ELEMENTWISE:
        return "elementwise" if numel > ELEMENTWISE_SLICE else None
    if job.method.name == "ties" and numel > CHUNK_ELEMENTS:
        params = job.method.resolve(job.model_params, job.global_params, tensor_name=job.name)
        if params["rescale"] == "none":
            return "ties"
    return None


Unit = tuple  # (loader: () -> loaded inputs, processor: (loaded) -> None)


def _units(order: list[Job], inputs: Inputs, writer: Any, options: RunOptions, bar: Any,
           lean: dict[str, "_Lean"]) -> Iterator[Unit]:
    """The merge as a sequence of (load, process) steps: a whole tensor, or one slice of a big one.

    Loading (pread + NaN check) never depends on what earlier steps computed (a background
    reader could run step i+1's load during step i; on 2 cores that gained nothing, measured).
    """
    streaming = isinstance(writer, StreamingShardedWriter)
    for job in order:
        if job.name in lean:
            yield from _lean_units(job, lean[job.name], inputs, writer)
            continue
        kind = _chunk_kind(job, options) if streaming else None
        if kind is None:
            yield _whole_unit(job, inputs, writer)
        elif kind == "elementwise":
            yield from _elementwise_units(job, inputs, writer)
        else:
            yield from _ties_units(job, inputs, writer)
        bar.update(1)


def _ranges(job: Job, size: int) -> list[tuple[int, int]]:
    numel = math.prod(job.shape)
    return [(a, min(numel, a + size)) for a in range(0, numel, size)]


def _elementwise_units(job: Job, inputs: Inputs, writer: Any) -> Iterator[Unit]:
    """``linear`` / ``task_arithmetic`` slice by slice. The NaN/Inf check runs on the slice's
    output, one pass instead of one per input: a NaN or Inf in any input makes the output
    non-finite (every input enters as ``w * x`` or ``w * (x - base)``, and ``0 * Inf`` is NaN), so
    the inputs are checked, exactly as elsewhere, only when it is; an output that overflowed from
    finite inputs is written as before."""
    def process(loaded: Any, a: int) -> None:
        tensors, base = loaded
        out = job.method.merge(tensors, base, job.model_params, job.global_params, tensor_name=job.name)
        if inputs.options.nan_policy != "ignore" and _has_nonfinite(out):
            if base is not None:
                inputs._check_finite(base, job.base.model, job.base.tensor)
            for ref, t in zip(job.inputs, tensors):
                inputs._check_finite(t, ref.model, ref.tensor)
        writer.add_part(job.name, out.to("cpu", job.out_dtype or out.dtype), a)

    for a, b in _ranges(job, ELEMENTWISE_SLICE):
        yield (lambda a=a, b=b: inputs.load_flat(job, a, b, check=False)), (lambda loaded, a=a: process(loaded, a))


@dataclass(frozen=True)
class _Lean:
    """How a job runs in numpy: its computation dtype, each input's stored dtype, the output's."""
    compute: str
    stored: tuple[str, ...]      # base first when the method uses one, then the inputs
    out: str


#: run eligible elementwise jobs in numpy (False: every job in torch; tests compare the two)
NUMPY_ELEMENTWISE = True


def _lean_refs(job: Job) -> list[Any]:
    """The tensors a numpy job reads, in the order of :attr:`_Lean.stored`: the base, then the inputs."""
    return [job.base, *job.inputs]


def _lean_job(job: Job, inputs: Inputs) -> Optional[_Lean]:
    """Whether ``job`` runs in numpy (:mod:`~mergekit_bico.methods.elementwise_np`), bit for bit
    as in torch: ``task_arithmetic`` on the CPU with a base and at most ``MAX_INPUTS`` inputs, all
    floating safetensors tensors of one shape, no transfer, no DARE seed, computed in float32 or
    float64; a float64 computation only with a float32/float64 output (torch's float64 -> 16-bit
    rounding is not reproduced)."""
    from mergekit_bico.methods import elementwise_np as enp

    if not NUMPY_ELEMENTWISE or inputs.options.device != "cpu" or job.method.name not in NUMPY_METHODS:
        return None
    if job.seed is not None:
        return None
    if not job.inputs or len(job.inputs) > enp.MAX_INPUTS:
        return None
    if job.base is None:
        return None  # the torch path raises the method's error
    refs = _lean_refs(job)
    if any(r.transfer is not None for r in refs):
        return None
    models = inputs.plan.models
    stored = []
    for r in refs:
        model = models[r.model]
        if not model.can_read_raw(r.tensor) or tuple(model.shape(r.tensor)) != tuple(job.shape):
            return None
        stored.append(model.dtype_name(r.tensor))
    if any(d not in enp.STORAGE for d in stored):
        return None
    compute = inputs.compute_name
    if compute is None:
        compute = stored[0]
        for d in stored[1:]:
            compute = promote(compute, d)
    if compute not in enp.COMPUTE:
        return None     # 16-bit arithmetic: torch's fused kernels are faster (see elementwise_np)
    out = job.out_dtype_name or compute
    if compute == "float64" and out not in ("float64", "float32"):
        return None
    return _Lean(compute, tuple(stored), out)


def _lean_units(job: Job, lean: _Lean, inputs: Inputs, writer: Any) -> Iterator[Unit]:
    """``task_arithmetic`` in numpy, slice by slice (whole tensors up to
    ``ELEMENTWISE_SLICE`` elements); NaN/Inf checked on each slice's output as in
    :func:`_elementwise_units`."""
    import numpy as np

    from mergekit_bico.methods import elementwise_np as enp

    params = job.method.resolve(job.model_params, job.global_params, tensor_name=job.name)
    refs = _lean_refs(job)
    models = inputs.plan.models
    numel = math.prod(job.shape)

    def load(a: int, b: int) -> list[Any]:
        arrays = []
        for ref, dtype in zip(refs, lean.stored):
            raw = np.empty(b - a, dtype=enp.STORAGE[dtype])
            models[ref.model].read_flat_into(ref.tensor, a, raw)
            arrays.append(raw)
        return arrays

    def process(raws: list[Any], a: int) -> None:
        work = [enp.to_work(raw, dtype, lean.compute) for raw, dtype in zip(raws, lean.stored)]
        out = enp.task_arithmetic(work[1:], work[0], params["weight"], dtype=lean.compute,
                                  normalize=params["normalize"], lambda_=params["lambda"])
        if inputs.options.nan_policy != "ignore" and enp.has_nonfinite(out):
            for ref, x in zip(refs, work):
                if enp.has_nonfinite(x):
                    inputs.nonfinite(ref.model, ref.tensor)
        writer.add_part_bytes(job.name, enp.from_work(out, lean.out), a, lean.out)

    for a in range(0, max(numel, 1), ELEMENTWISE_SLICE):
        b = min(numel, a + ELEMENTWISE_SLICE)
        yield (lambda a=a, b=b: load(a, b)), (lambda loaded, a=a: process(loaded, a))


def _whole_unit(job: Job, inputs: Inputs, writer: Any) -> Unit:
    """Load, merge and write ``job`` in one step (the whole tensor)."""
    return (lambda: inputs.load(job)), (lambda loaded: writer.add(job.name, _merge_loaded(job, inputs, loaded)))


def _ties_units(job: Job, inputs: Inputs, writer: Any) -> Iterator[Unit]:
    """TIES slice by slice: two counting passes find every input's top-k threshold (radix select
    over histograms of the whole tensor), the third merges; the result equals the whole-tensor one.
    Equal magnitudes at a threshold go to the lowest flat indices (``tie_break: index``); with
    ``tie_break: sort`` such a tensor is merged whole instead, so that mergekit's sort decides."""
    from mergekit_bico.methods.sparsify import MagnitudeThreshold, magnitude_keys
    from mergekit_bico.methods.task_arithmetic import generalized_task_arithmetic

    numel = math.prod(job.shape)
    ranges = _ranges(job, CHUNK_ELEMENTS)
    params = job.method.resolve(job.model_params, job.global_params, tensor_name=job.name)
    dens = params["density"]
    ks = [None if d >= 1 else max(1, int(d * numel)) for d in dens]
    active = [i for i, k in enumerate(ks) if k is not None and k < numel and dens[i] > 0]
    thresholds: list[Any] = [MagnitudeThreshold.drop_all() if d <= 0 else None for d in dens]
    highs = {i: torch.zeros(1 << 15, dtype=torch.int64) for i in active}
    lows = {i: torch.zeros(1 << 16, dtype=torch.int64) for i in active}
    picks: dict[int, tuple[int, int]] = {}

    def promoted(loaded: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        tensors, base = loaded
        dtype = base.dtype
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        return [t.to(dtype) for t in tensors], base.to(dtype)

    def count_high(loaded: Any) -> None:
        tensors, base = promoted(loaded)
        for i in active:
            highs[i] += MagnitudeThreshold.high_histogram(magnitude_keys(torch.sub(tensors[i], base)))

    def count_low(loaded: Any) -> None:
        if not picks:
            picks.update({i: MagnitudeThreshold.pick_digit(highs[i], numel, ks[i]) for i in active})
        tensors, base = promoted(loaded)
        for i in active:
            lows[i] += MagnitudeThreshold.low_histogram(magnitude_keys(torch.sub(tensors[i], base)), picks[i][0])

    def merge(loaded: Any, a: int) -> None:
        tensors, base = promoted(loaded)
        out = generalized_task_arithmetic(
            tensors, base, weight=params["weight"], sparsification="magnitude", consensus="sum",
            normalize=params["normalize"], rescale="none", lambda_=params["lambda"], thresholds=thresholds,
        )
        writer.add_part(job.name, out.to("cpu", job.out_dtype or out.dtype), a)

    if active:
        for a, b in ranges:
            yield (lambda a=a, b=b: inputs.load_flat(job, a, b, check=False)), count_high
        for a, b in ranges:
            yield (lambda a=a, b=b: inputs.load_flat(job, a, b, check=False)), count_low
        # the units above have been processed by now: the consumer runs each before asking for the next
        for i in active:
            thresholds[i] = MagnitudeThreshold.from_histograms(lows[i], picks[i][0], picks[i][1], numel, ks[i])
        if params["tie_break"] == "sort" and any(thresholds[i].ambiguous for i in active):
            yield _whole_unit(job, inputs, writer)   # mergekit's sort decides among equal magnitudes
            return
    for a, b in ranges:
        yield (lambda a=a, b=b: inputs.load_flat(job, a, b)), (lambda loaded, a=a: merge(loaded, a))


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN or +-Inf.

    One reduction pass and no temporaries: any NaN/Inf makes the sum NaN/Inf; only when the sum
    is not finite (which a float32 overflow can also cause) is the exact elementwise check run.
    ``torch.isfinite(t).all()`` costs several passes and a bool tensor the size of ``t``.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return False
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return False
    return not bool(torch.isfinite(t).all())


def _merge_one(job: Job, inputs: Inputs) -> torch.Tensor:
    return _merge_loaded(job, inputs, inputs.load(job))


def _merge_loaded(job: Job, inputs: Inputs, loaded: Any) -> torch.Tensor:
    tensors, base = loaded
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


def _patch_config(out_dir: Path, plan: Plan, out_dtype: Optional[str]) -> None:
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
        name = out_dtype
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
    compute_dtype = plan.config.dtype or None    # a name; torch dtypes are made where torch runs
    inputs = Inputs(plan, options, compute_dtype)
    extra_reports: list[Any] = prepare(inputs) if prepare else []
    order = _storage_order(plan)
    protected = [Path(p) for p in plan.models]
    with atomic_output_dir(out_path, overwrite=options.overwrite, protected=protected) as tmp:
        metadata = {"format": "pt", "mergekit_bico": plan.method.name}
        layout = _output_layout(plan, order, compute_dtype) if hasattr(os, "pwrite") else None
        if layout is not None:  # stream every tensor to disk as it is merged
            writer: Any = StreamingShardedWriter(tmp, options.out_shard_size, layout, metadata=metadata)
        else:
            writer = ShardedWriter(tmp, options.out_shard_size, metadata=metadata)
        lean = {}
        if isinstance(writer, StreamingShardedWriter):
            lean = {job.name: how for job in order if (how := _lean_job(job, inputs)) is not None}
        with tqdm(total=len(order), desc="merging", unit="tensor", disable=not options.progress) as bar:
            for load, process in _units(order, inputs, writer, options, bar, lean):
                process(load())
        writer.finish()
        ref = plan.base_path or plan.entries[0].path
        tok_src = None
        if plan.config.tokenizer_source not in (None, "base"):
            from mergekit_bico.plan import resolve_model_path
            tok_src = Path(resolve_model_path(plan.config.tokenizer_source, plan.config_dir))
        copy_support_files(Path(ref), tmp, tokenizer_source=tok_src if options.copy_tokenizer else None)
        if not options.copy_tokenizer:
            for f in tmp.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")):
                    f.unlink()
        _patch_config(tmp, plan, plan.jobs[0].out_dtype_name if plan.jobs else None)
        (tmp / "mergekit_config.yml").write_text(config_text if config_text.endswith("\n") else config_text + "\n")
        if options.write_model_card:
            (tmp / "README.md").write_text(model_card(config_text, plan))
        reports: list[Path] = []
        for i, rep in enumerate(extra_reports):
            for p in rep.write_report(tmp, f"transfer_report_{i}"):
                reports.append(out_path / p.name)
        bytes_written = writer.bytes_written
    return RunResult(out_path, len(order), bytes_written, time.perf_counter() - start, reports)


def _output_layout(plan: Plan, order: list[Job], compute_dtype: Optional[str]) -> Optional[list[tuple[str, str, tuple[int, ...]]]]:
    """(name, dtype, shape) of every output tensor in ``order``, as ``_merge_one`` will produce them,
    from the input headers alone; None when that cannot be known up front (then the writer buffers).

    dtype: ``out_dtype``, else the computation dtype: ``dtype:`` of the config, else the promotion
    of the inputs' dtypes (non-floating tensors are copied, so they keep the first input's dtype).
    """
    if any(job.method.name == "passthrough" for job in order):
        return None
    layout = []
    try:
        for job in order:
            if job.out_dtype_name is not None:
                dtype = job.out_dtype_name
            else:
                refs = ([job.base] if job.base is not None else []) + list(job.inputs)
                if not refs or any(r.transfer is not None for r in refs):
                    return None
                dtypes = [plan.models[r.model].dtype_name(r.tensor) for r in refs]
                if compute_dtype is not None:
                    dtypes = [compute_dtype for _ in dtypes]
                if not all(d in FLOATING for d in dtypes):
                    return None
                dtype = dtypes[0]
                for d in dtypes[1:]:
                    dtype = promote(dtype, d)
            layout.append((job.name, dtype, tuple(job.shape)))
    except Exception:  # noqa: BLE001 - anything unusual: fall back to the buffering writer
        return None
    return layout


def _storage_order(plan: Plan) -> list[Job]:
    """Jobs sorted by where their first input lies on disk (shard, then offset), so reads stream."""
    ref = plan.models.get(plan.base_path or "") or plan.models[plan.entries[0].path]
    rank = {name: i for i, name in enumerate(ref.keys())}
    return sorted(plan.jobs, key=lambda j: (rank.get(j.inputs[0].tensor if j.inputs else j.name, len(rank)),
                                            (layer_of(j.name) or ("", -1, ""))[1]))


def config_yaml(config: MergeConfig) -> str:
    return yaml.safe_dump(config.model_dump(exclude_none=True, mode="json"), sort_keys=False)
