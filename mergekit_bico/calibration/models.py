"""Loading whole models for calibration (the only stage that uses transformers' model classes).

:func:`load_model` returns a float32 model in eval mode (dropout off) whose parameters all require
gradients, plus the tokenizer from the same folder. :func:`checkpoint_names` maps transformers'
``named_parameters`` names to the tensor names of the checkpoint files (``LazyModel.keys()``),
which is where every statistic is stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError
from mergekit_bico.calibration.losses import CAUSAL_LM, CUSTOM, SEQUENCE_CLASSIFICATION, head_kind, loss_kind

logger = logging.getLogger(__name__)

__all__ = ["load_model", "read_model_config", "checkpoint_names", "tokenizer_fingerprint", "one_line"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An exception message squeezed to one line of at most ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_model_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict; CalibrationError when absent or invalid."""
    p = Path(path)
    if not p.is_dir():
        raise CalibrationError(f"model '{p}' is not a folder (calibration needs a transformers model folder)")
    cfg = p / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"model '{p}' has no config.json; calibration needs a transformers model folder") from None
    except (OSError, ValueError) as err:
        raise CalibrationError(f"model '{p}': unreadable config.json ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"model '{p}': config.json is not a JSON object")
    return data


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the tokenizer files present in a model folder (part of every cache key)."""
    h = hashlib.sha256(b"tokenizer-v1\0")
    for name in _TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _refuse_model_code(path: Path, model_config: Mapping[str, Any], cfg: CalibrationConfig) -> None:
    """CalibrationError when loading ``path`` would run Python code shipped in the model folder
    (``auto_map`` for a ``model_type`` transformers does not know) and the config does not allow it."""
    if cfg.trust_remote_code or not model_config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = model_config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        return  # transformers' own class is used; the folder's code is not run
    raise CalibrationError(
        f"model '{path}' needs Python code from its own folder (config.json auto_map, model_type "
        f"{model_type!r} is not built into transformers); it is not run unless the calibration block "
        "says trust_remote_code: true"
    )


def _model_class(kind: str, model_config: Mapping[str, Any]):
    import transformers

    head = kind if kind != CUSTOM else head_kind(model_config)
    if head == CAUSAL_LM:
        return transformers.AutoModelForCausalLM
    if head == SEQUENCE_CLASSIFICATION:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def load_model(path: str | Path, cfg: CalibrationConfig, *, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load ``path`` for calibration: (model, tokenizer).

    The class follows the loss (:func:`loss_kind`): AutoModelForCausalLM for ``causal_lm``,
    AutoModelForSequenceClassification for ``sequence_classification``; for a user loss, the
    config's ``architectures`` decide, else AutoModel. float32, ``eval()`` (dropout off), every
    parameter ``requires_grad``, moved to ``device``; ``trust_remote_code`` from ``cfg``.
    """
    p = Path(path)
    model_config = read_model_config(p)
    kind = loss_kind(cfg, model_config)
    cls = _model_class(kind, model_config)
    try:
        import transformers
    except ImportError:  # pragma: no cover - a dependency
        raise CalibrationError("calibration needs the transformers package: pip install transformers") from None
    _refuse_model_code(p, model_config, cfg)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # our own bars report the calibration's progress
    try:
        try:
            model, info = cls.from_pretrained(
                str(p), dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, output_loading_info=True
            )
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model, info = cls.from_pretrained(
                str(p), torch_dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, output_loading_info=True
            )
    except CalibrationError:
        raise
    except Exception as err:  # transformers raises many types (OSError, ValueError, KeyError, ...)
        raise CalibrationError(f"cannot load model '{p}' as {cls.__name__} for calibration: {one_line(err)}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = list(info.get("missing_keys") or []) if isinstance(info, dict) else []
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        logger.warning(
            "model '%s': %d weights are not in the checkpoint and were randomly initialised by %s (%s); "
            "their statistics describe random weights", p, len(missing), cls.__name__, shown,
        )
    try:
        model = model.to(device=device, dtype=torch.float32)
    except Exception as err:
        raise CalibrationError(f"cannot move model '{p}' to device '{device}': {one_line(err)}") from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise CalibrationError(f"cannot load the tokenizer of model '{p}' for calibration: {one_line(err)}") from None
    return model, tokenizer


def _candidates(name: str, prefix: str) -> Iterable[str]:
    yield name
    if prefix and name.startswith(prefix + "."):
        yield name[len(prefix) + 1 :]
    if prefix:
        yield f"{prefix}.{name}"
    # pre-2020 BERT-style checkpoints spell LayerNorm parameters gamma / beta
    for old, new in ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta")):
        if name.endswith(old):
            base = name[: -len(old)] + new
            yield base
            if prefix and base.startswith(prefix + "."):
                yield base[len(prefix) + 1 :]


def checkpoint_names(model: torch.nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, list[str]]:
    """Map each canonical parameter name (``named_parameters()``, tied duplicates removed) to the
    checkpoint tensor names it is stored under (all aliases of a tied weight that the checkpoint has).

    A name matches exactly, or with ``base_model_prefix`` removed / added (GPT-2 hub checkpoints
    lack ``transformer.``), or as a legacy ``LayerNorm.gamma/beta``. Parameters absent from the
    checkpoint map to ``[]``.
    """
    keys = set(checkpoint_keys)
    prefix = getattr(model, "base_model_prefix", "") or ""
    canonical: dict[int, str] = {}
    for name, param in model.named_parameters():
        canonical.setdefault(id(param), name)
    mapping: dict[str, list[str]] = {name: [] for name in canonical.values()}
    for alias, param in model.named_parameters(remove_duplicate=False):
        owner = canonical[id(param)]
        for cand in _candidates(alias, prefix):
            if cand in keys:
                if cand not in mapping[owner]:
                    mapping[owner].append(cand)
                break
    return mapping
