"""Diagonal Fisher information of a model on its calibration data.

    F[j] = (1/N) * sum_n E_{y ~ q_n} [ (d/d theta_j  log p_theta(y | x_n))^2 ]

one squared gradient PER EXAMPLE (never the square of a batch-summed gradient), so the result does
not depend on ``batch_size``. An *example* is one calibration sample: for a sequence classifier its
class prediction; for a causal LM the whole sequence, i.e. the gradient of the SUM of its next-token
log-likelihoods (not of each token separately).

Estimators (``q_n`` above):

* ``expected`` (default): ``y`` from the model's own predictive distribution. For classification
  the expectation is exact: ``sum_c p_c (grad log p_c)^2`` (one backward pass per class). For a
  causal LM it is sampled: at every real position ``t`` a token ``y_t ~ p(. | x_<t)`` (the context
  stays the real text, teacher forcing), ``lm_samples`` sampled sequences per example, averaged;
  the sampler is a ``torch.Generator`` seeded by ``(cfg.seed, example index)``, so the result is
  reproducible and independent of batching and device.
* ``empirical``: ``y`` the true label / the real next tokens (one backward pass per example).

Why ``expected`` is the default: it is the actual Fisher, the curvature the Fisher-merging
derivation (Laplace approximation of each model's posterior) relies on, and it needs no labels.
The empirical Fisher is a different object: near a fitted optimum gradients at the true labels
shrink on well-fit examples and it under-weights exactly the parameters the task relies on
(Kunstner et al., 2019, "Limitations of the empirical Fisher approximation"). For LMs the default
costs the same as ``empirical`` (one sample, one backward per sequence); for classifiers it costs one
backward per class. A user loss (``package.module:function``) only has the empirical estimator.

Per-example gradients come from a loop of batch-1 forward/backward passes on each example with
its padding removed, so padding never enters the statistic. Parameters the loss does not reach
get an all-zero Fisher. Tensors are stored under the checkpoint names (``LazyModel.keys()``); a
tied weight is stored under every checkpoint name that holds it. The global L2 norm of the Fisher
(each parameter counted once) is recorded in the metadata as ``fisher_norm``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError
from mergekit_bico.calibration.data import data_fingerprint, load_samples, make_batches
from mergekit_bico.calibration.losses import (
    CAUSAL_LM,
    CUSTOM,
    SEQUENCE_CLASSIFICATION,
    LossFn,
    causal_lm_token_losses,
    head_kind,
    loss_kind,
    model_inputs,
    resolve_loss,
)
from mergekit_bico.calibration.models import checkpoint_names, load_model, tokenizer_fingerprint
from mergekit_bico.calibration.store import StatsFile, StatsStore

logger = logging.getLogger(__name__)

__all__ = [
    "ESTIMATORS",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_LM_SAMPLES",
    "FISHER_KIND",
    "compute_fisher",
    "fisher_diagonal",
    "fisher_norm",
    "fisher_cache_key",
]

ESTIMATORS = ("expected", "empirical")
DEFAULT_ESTIMATOR = "expected"
DEFAULT_LM_SAMPLES = 1
FISHER_KIND = "fisher"
# bump when the maths or the file layout changes: old cache entries then stop matching
FISHER_VERSION = 1


def _example_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"fisher-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _split_examples(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One batch-1 dict per row, with the padding positions (attention_mask == 0) removed."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    out = []
    for i in range(input_ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones_like(input_ids[i], dtype=torch.bool)
        ex: dict[str, torch.Tensor] = {}
        for name, value in batch.items():
            if value.dim() >= 2 and value.shape[:2] == input_ids.shape:
                ex[name] = value[i][keep].unsqueeze(0)
            else:
                ex[name] = value[i : i + 1]
        out.append(ex)
    return out


def _logits(model: torch.nn.Module, ex: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**model_inputs(ex))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits.float()


def _check_finite(value: torch.Tensor, what: str, batch_index: int) -> None:
    if not torch.isfinite(value.detach()).all():
        raise CalibrationError(f"calibration {what} is NaN/Inf on batch {batch_index}")


def fisher_diagonal(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    kind: str,
    estimator: str = DEFAULT_ESTIMATOR,
    loss_fn: Optional[Callable[..., torch.Tensor]] = None,
    lm_samples: int = DEFAULT_LM_SAMPLES,
    seed: int = 0,
    progress: bool = False,
    desc: str = "Fisher",
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher of ``model`` over ``batches``: ``({parameter name: F [param shape] float32}, N)``.

    ``kind``: ``causal_lm`` / ``sequence_classification`` (built-in losses on ``.logits``) or
    ``custom`` (``loss_fn(model, batch_of_one)`` is the example's negative log-likelihood; empirical
    only). Names are ``model.named_parameters()`` names (tied duplicates once). F is the mean over
    the N examples of the squared per-example gradient (see the module docstring).
    """
    if estimator not in ESTIMATORS:
        raise CalibrationError(f"unknown Fisher estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if kind == CUSTOM and estimator != "empirical":
        raise CalibrationError(
            "Fisher estimator 'expected' needs a built-in loss (causal_lm or sequence_classification); "
            "use estimator 'empirical' with a user loss"
        )
    if kind == CUSTOM and loss_fn is None:
        raise CalibrationError("a user loss needs loss_fn")
    if lm_samples < 1:
        raise CalibrationError(f"lm_samples must be >= 1, got {lm_samples}")
    names, params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name)
            params.append(param)
    if not params:
        raise CalibrationError("the calibration model has no trainable parameters")
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    def add(target: torch.Tensor, scale: float = 1.0, retain: bool = False) -> None:
        grads = torch.autograd.grad(target, params, retain_graph=retain, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                if scale == 1.0:
                    a.addcmul_(g.float(), g.float())
                else:
                    a.addcmul_(g.float(), g.float(), value=scale)

    from tqdm.auto import tqdm

    n_examples = 0
    for batch_index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        for ex in _split_examples(batch):
            index = n_examples
            n_examples += 1
            if ex["input_ids"].shape[-1] == 0:
                continue  # nothing to predict: zero gradient
            if kind == CUSTOM:
                loss = loss_fn(model, ex, batch_index=batch_index) if isinstance(loss_fn, LossFn) else loss_fn(model, ex)
                if loss.requires_grad:
                    add(loss)
                continue
            logits = _logits(model, ex)
            _check_finite(logits, "logits", batch_index)
            if kind == SEQUENCE_CLASSIFICATION:
                logp = F.log_softmax(logits.reshape(-1), dim=-1)
                if estimator == "empirical":
                    label = int(ex["labels"].reshape(-1)[0])
                    if not 0 <= label < logp.shape[0]:
                        raise CalibrationError(
                            f"calibration label {label} on batch {batch_index} is out of range for a model with {logp.shape[0]} classes"
                        )
                    add(-logp[label])
                else:
                    probs = logp.detach().exp()
                    classes = logp.shape[0]
                    for c in range(classes):
                        if probs[c] > 0:  # an underflowed class contributes exactly 0
                            add(logp[c], scale=float(probs[c]), retain=True)
            elif kind == CAUSAL_LM:
                if logits.shape[1] < 2:
                    continue  # a one-token sequence has no next-token target
                if estimator == "empirical":
                    add(causal_lm_token_losses(logits, ex["labels"]).sum())
                else:
                    logp = F.log_softmax(logits[0, :-1, :], dim=-1)  # [T-1, V]
                    gen = torch.Generator(device="cpu").manual_seed(_example_seed(seed, index))
                    draws = torch.multinomial(logp.detach().exp().cpu(), lm_samples, replacement=True, generator=gen)
                    draws = draws.to(logp.device)  # [T-1, S]
                    for s in range(lm_samples):
                        seq_logp = logp.gather(1, draws[:, s : s + 1]).sum()
                        add(seq_logp, scale=1.0 / lm_samples, retain=s < lm_samples - 1)
            else:
                raise CalibrationError(f"unknown loss kind {kind!r}")
    if n_examples == 0:
        raise CalibrationError("no calibration examples to compute the Fisher from")
    fisher = {name: a.div_(n_examples).cpu() for name, a in zip(names, acc)}
    return fisher, n_examples


def shifted_fingerprint(model_fingerprint: str, delta_fingerprint: str) -> str:
    """Fingerprint of a model plus a delta (the model a transferred entry stands for)."""
    return hashlib.sha256(f"{model_fingerprint}+{delta_fingerprint}".encode()).hexdigest()


def _add_delta(model: torch.nn.Module, mapping: Mapping[str, Sequence[str]],
               delta: Callable[[str], Optional[torch.Tensor]], label: str) -> None:
    """Add ``delta(checkpoint name)`` to every parameter in place (a tied parameter once, from its
    first checkpoint name)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, cks in mapping.items():
            if not cks or pname not in params:
                continue
            d = delta(cks[0])
            if d is None:
                continue
            p = params[pname]
            if d.numel() != p.numel():
                raise CalibrationError(
                    f"{label}: delta for '{cks[0]}' has shape {list(d.shape)} but the model's parameter "
                    f"'{pname}' has {list(p.shape)}")
            p.add_(d.reshape(p.shape).to(device=p.device, dtype=p.dtype))


def fisher_norm(stats: StatsFile) -> float:
    """The global L2 norm of a stats file's Fisher (recorded at calibration time)."""
    try:
        return float(stats.metadata["fisher_norm"])
    except (KeyError, ValueError):
        raise CalibrationError(f"stats file '{stats.path}' records no fisher_norm") from None


def _settings(cfg: CalibrationConfig) -> dict[str, Any]:
    return cfg.model_dump(exclude={"data"})


def fisher_cache_key(
    store: StatsStore,
    *,
    model_fingerprint: str,
    tokenizer: str,
    data: str,
    cfg: CalibrationConfig,
    estimator: str,
    kind: str,
    lm_samples: int,
) -> str:
    """Cache key of a Fisher statistic: model + tokenizer + data fingerprints and every setting."""
    return store.key(
        FISHER_KIND,
        version=FISHER_VERSION,
        model=model_fingerprint,
        tokenizer=tokenizer,
        data=data,
        settings=_settings(cfg),
        estimator=estimator,
        loss_kind=kind,
        lm_samples=lm_samples if (kind == CAUSAL_LM and estimator == "expected") else None,
    )


def compute_fisher(
    model_path: str | Path,
    cfg: CalibrationConfig,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    device: str = "cpu",
    store: StatsStore,
    progress: bool = True,
    lm_samples: int = DEFAULT_LM_SAMPLES,
    delta: Optional[Callable[[str], Optional[torch.Tensor]]] = None,
    delta_fingerprint: Optional[str] = None,
    label: Optional[str] = None,
) -> Path:
    """Compute (or reuse) the diagonal Fisher of ``model_path`` on ``cfg.data``; return the stats file.

    The cache key covers ``LazyModel.fingerprint()``, the tokenizer files, the data bytes and every
    setting; a matching file is reused (logged "reusing cached Fisher statistics from ...").

    ``delta``: the Fisher is taken at ``model_path`` plus ``delta(checkpoint name)`` (a tensor of the
    checkpoint tensor's shape, or None: unchanged), e.g. a fine-tune transferred onto this base;
    ``delta_fingerprint`` identifies that delta and replaces the model's fingerprint by
    :func:`shifted_fingerprint` (what a reader must pass to ``store.open``).
    """
    from mergekit_bico.io.loader import LazyModel

    if estimator not in ESTIMATORS:
        raise CalibrationError(f"unknown Fisher estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    path = Path(model_path)
    lazy = LazyModel(path)
    if (delta is None) != (delta_fingerprint is None):
        raise ValueError("give delta and delta_fingerprint together")
    model_fp = lazy.fingerprint() if delta is None else shifted_fingerprint(lazy.fingerprint(), delta_fingerprint)
    shown = label or path.name
    model_config = lazy.config_dict()
    kind = loss_kind(cfg, model_config)
    if kind == CUSTOM and estimator != "empirical":
        raise CalibrationError(
            f"model '{path}': Fisher estimator 'expected' needs a built-in loss, not '{cfg.loss}'; "
            "use the 'empirical' estimator with a user loss"
        )
    key = fisher_cache_key(
        store,
        model_fingerprint=model_fp,
        tokenizer=tokenizer_fingerprint(path),
        data=data_fingerprint(cfg),
        cfg=cfg,
        estimator=estimator,
        kind=kind,
        lm_samples=lm_samples,
    )
    cached = store.lookup(FISHER_KIND, key)
    if cached is not None:
        try:
            store.open(cached, model_fingerprint=model_fp)
        except CalibrationError as err:
            logger.warning("recomputing Fisher statistics: %s", err)
        else:
            logger.info("reusing cached Fisher statistics from %s", cached)
            return cached

    need_labels = kind == SEQUENCE_CLASSIFICATION and estimator == "empirical"
    samples = load_samples(cfg, need_labels=need_labels)
    start = time.perf_counter()
    model, tokenizer = load_model(path, cfg, device=device)
    mapping = checkpoint_names(model, lazy.keys())
    if delta is not None:
        _add_delta(model, mapping, delta, shown)
    load_seconds = time.perf_counter() - start
    is_causal = kind == CAUSAL_LM or (kind == CUSTOM and head_kind(model_config) == CAUSAL_LM)
    batches = [
        {k: v.to(device) for k, v in b.items()} for b in make_batches(samples, tokenizer, cfg, causal_lm=is_causal)
    ]
    loss_fn = resolve_loss(cfg, model) if kind == CUSTOM else None
    start = time.perf_counter()
    fisher, n_examples = fisher_diagonal(
        model,
        batches,
        kind=kind,
        estimator=estimator,
        loss_fn=loss_fn,
        lm_samples=lm_samples,
        seed=cfg.seed,
        progress=progress,
        desc=f"Fisher {shown}",
    )
    seconds = time.perf_counter() - start

    tensors: dict[str, torch.Tensor] = {}
    for name, ck_names in mapping.items():
        for ck in ck_names:
            expected_shape = tuple(lazy.shape(ck))
            if tuple(fisher[name].shape) != expected_shape:
                if fisher[name].numel() == math.prod(expected_shape):
                    tensors[ck] = fisher[name].reshape(expected_shape)
                    continue
                raise CalibrationError(
                    f"model '{path}': parameter '{name}' has shape {tuple(fisher[name].shape)} but checkpoint "
                    f"tensor '{ck}' has {expected_shape}"
                )
            tensors[ck] = fisher[name]
    if not tensors:
        raise CalibrationError(f"model '{path}': no model parameter matches a checkpoint tensor name")
    unmapped = [n for n, cks in mapping.items() if not cks]
    if unmapped:
        logger.warning("model '%s': %d parameters are not in the checkpoint and get no Fisher (%s)",
                       path, len(unmapped), ", ".join(unmapped[:5]))
    norm = math.sqrt(sum(float(fisher[n].double().pow(2).sum()) for n, cks in mapping.items() if cks))
    metadata = {
        "model_fingerprint": model_fp,
        "model_path": str(path),
        **({} if delta is None else {"delta": label or "delta", "delta_fingerprint": delta_fingerprint}),
        "data_path": str(cfg.data),
        "statistic": "diagonal_fisher",
        "estimator": estimator,
        "loss": cfg.loss,
        "loss_kind": kind,
        "lm_samples": str(lm_samples),
        "examples": str(n_examples),
        "fisher_norm": repr(norm),
        "settings": json.dumps(_settings(cfg), sort_keys=True),
        "seconds": f"{seconds:.3f}",
    }
    out = store.save(FISHER_KIND, key, tensors, metadata)
    logger.info(
        "Fisher statistics of '%s': %d examples in %.1f s (model load %.1f s) -> %s",
        path if delta is None else shown, n_examples, seconds, load_seconds, out,
    )
    del model
    return out
