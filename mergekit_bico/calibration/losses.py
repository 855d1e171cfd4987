"""Calibration losses: ``causal_lm``, ``sequence_classification`` and user functions.

``calibration.loss``:

* ``causal_lm``: next-token cross-entropy, mean over real (non-padding) target tokens;
* ``sequence_classification``: cross-entropy of the class logits at ``labels``, mean over examples;
* ``package.module:function``: ``function(model, batch) -> scalar tensor``, imported on use;
* ``auto`` (default): from the model config's ``architectures``: ``*ForSequenceClassification``
  -> sequence_classification, ``*ForCausalLM`` / ``*LMHeadModel`` -> causal_lm.

Every loss returned by :func:`resolve_loss` is checked at call time: a non-scalar, NaN or Inf
result is a :class:`CalibrationError` naming the loss and the batch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError

__all__ = [
    "CAUSAL_LM",
    "SEQUENCE_CLASSIFICATION",
    "CUSTOM",
    "LossFn",
    "loss_kind",
    "head_kind",
    "resolve_loss",
    "import_user_loss",
    "model_inputs",
    "causal_lm_token_losses",
    "causal_lm_example_losses",
]

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
CUSTOM = "custom"

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_CLASSIFICATION_SUFFIXES = ("ForSequenceClassification",)


def head_kind(model_config: Mapping[str, Any]) -> Optional[str]:
    """``causal_lm`` / ``sequence_classification`` from ``architectures`` in a config dict, else None."""
    for arch in model_config.get("architectures") or []:
        if isinstance(arch, str) and arch.endswith(_CLASSIFICATION_SUFFIXES):
            return SEQUENCE_CLASSIFICATION
        if isinstance(arch, str) and arch.endswith(_CAUSAL_SUFFIXES):
            return CAUSAL_LM
    return None


def loss_kind(cfg: CalibrationConfig, model_config: Mapping[str, Any]) -> str:
    """The loss to use: ``causal_lm``, ``sequence_classification`` or ``custom`` (a user function).

    ``auto`` picks by the config's ``architectures``; CalibrationError when it cannot.
    """
    if cfg.loss in (CAUSAL_LM, SEQUENCE_CLASSIFICATION):
        return cfg.loss
    if cfg.loss != "auto":
        return CUSTOM
    kind = head_kind(model_config)
    if kind is None:
        archs = model_config.get("architectures") or []
        raise CalibrationError(
            f"calibration loss 'auto' cannot pick a loss for architectures {list(archs)}; "
            "set calibration.loss to causal_lm, sequence_classification or 'package.module:function'"
        )
    return kind


def import_user_loss(spec: str) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """Import ``package.module:function``; CalibrationError naming it if that fails."""
    module_name, _, func_name = spec.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # like `python -m`: a module in the working directory is found too (console scripts
            # do not put it on sys.path); appended, so it never shadows an installed package
            cwd = os.getcwd()
            parents = {".".join(module_name.split(".")[: i + 1]) for i in range(module_name.count(".") + 1)}
            if err.name not in parents or cwd in sys.path:
                raise
            sys.path.append(cwd)
            module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error raised while importing the module
        raise CalibrationError(f"calibration loss '{spec}': cannot import module '{module_name}' ({type(err).__name__}: {err})") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise CalibrationError(f"calibration loss '{spec}': module '{module_name}' has no attribute '{func_name}'")
    if not callable(func):
        raise CalibrationError(f"calibration loss '{spec}': '{func_name}' is not callable")
    return func


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments a transformers model takes from a batch (labels left out)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**model_inputs(batch))
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits.float()


def causal_lm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: ``logits [B, T, V]``, ``labels [B, T]`` (-100 = ignore)
    -> ``[B, T-1]`` losses, 0 where the target is ignored (padding never counts)."""
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return losses.view(shift_labels.shape)


def causal_lm_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss (sum of its real next-token losses): ``[B]``."""
    return causal_lm_token_losses(logits, labels).sum(dim=1)


def _causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    token_losses = causal_lm_token_losses(_logits(model, batch), labels)
    count = (labels[:, 1:] != -100).sum().clamp(min=1)
    return token_losses.sum() / count


def _sequence_classification_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "labels" not in batch:
        raise CalibrationError("calibration loss 'sequence_classification' needs labels in the data (calibration.label_field)")
    return F.cross_entropy(_logits(model, batch), batch["labels"])


class LossFn:
    """A checked loss: ``loss(model, batch, batch_index=None) -> scalar``.

    Raises CalibrationError("calibration loss 'NAME' returned NaN on batch 3") for a non-scalar,
    NaN or Inf result. ``batch_index`` defaults to the number of earlier calls.
    """

    def __init__(self, name: str, kind: str, func: Callable[[torch.nn.Module, dict], Any]):
        self.name = name
        self.kind = kind
        self.func = func
        self.calls = 0

    def __call__(self, model: torch.nn.Module, batch: dict, batch_index: Optional[int] = None) -> torch.Tensor:
        index = self.calls if batch_index is None else batch_index
        self.calls += 1
        value = self.func(model, batch)
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(
                f"calibration loss '{self.name}' returned {type(value).__name__}, not a tensor, on batch {index}"
            )
        if value.numel() != 1:
            raise CalibrationError(
                f"calibration loss '{self.name}' returned a non-scalar of shape {tuple(value.shape)} on batch {index}"
            )
        value = value.reshape(())
        if not torch.isfinite(value.detach()):
            what = "NaN" if torch.isnan(value.detach()) else "Inf"
            raise CalibrationError(f"calibration loss '{self.name}' returned {what} on batch {index}")
        return value

    def __repr__(self) -> str:
        return f"LossFn({self.name!r})"


def _config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else {"architectures": getattr(config, "architectures", None)}


def resolve_loss(cfg: CalibrationConfig, model: Any) -> LossFn:
    """The loss for ``model`` per ``cfg.loss``: a callable ``(model, batch) -> scalar`` (batch mean
    over real tokens for causal_lm, over examples for sequence_classification)."""
    kind = loss_kind(cfg, _config_dict(model))
    if kind == CAUSAL_LM:
        return LossFn(CAUSAL_LM, kind, _causal_lm_loss)
    if kind == SEQUENCE_CLASSIFICATION:
        return LossFn(SEQUENCE_CLASSIFICATION, kind, _sequence_classification_loss)
    return LossFn(cfg.loss, kind, import_user_loss(cfg.loss))
