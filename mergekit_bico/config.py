"""The YAML schema: mergekit's merge configuration plus our ``calibration:`` and ``transfer:`` blocks.

Unlike mergekit, unknown keys are errors (with a suggestion), and every error is one line that
names the config file and the key.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_bico.errors import ConfigError

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class StrictModel(BaseModel):
    """Base of every config block: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class ConditionalParameter(StrictModel):
    """``{filter: "self_attn", value: 0.5}``: applies where ``filter`` is a substring of the tensor name."""

    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]

LOSS_NAMES = ("auto", "causal_lm", "sequence_classification")


class CalibrationConfig(StrictModel):
    """Calibration data and settings, shared by Fisher merging and BiCo transfer."""

    data: str
    samples: int = Field(128, gt=0)
    max_length: int = Field(256, gt=1)
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    loss: str = "auto"
    text_field: str = "text"
    label_field: str = "label"
    trust_remote_code: bool = False

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, value: str) -> str:
        if value in LOSS_NAMES:
            return value
        module, sep, func = value.partition(":")
        if not sep or not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
            raise ValueError(
                f"loss {value!r} is neither one of {', '.join(LOSS_NAMES)} nor 'package.module:function'"
            )
        return value


class TransferConfig(StrictModel):
    """Per-model ``transfer:`` block: carry this fine-tune's delta from ``source_base`` to the target base."""

    method: Literal["bico", "naive", "gradfix"] = "bico"
    source_base: str
    statistics: Literal["base", "finetuned"] = "base"
    output_space: Literal["gradients", "activations", "combined"] = "gradients"
    layer_map: Union[Literal["index", "similarity"], list[Optional[int]]] = "index"
    scale: Literal["none", "norms"] = "none"
    tie_maps: bool = False
    # a number >= 0 (0: the plain fit), or "auto" (the default): per space, the identity's share of
    # the best alignment, 0 where the statistics are explained exactly (procrustes.py)
    identity_prior: Union[float, Literal["auto"]] = "auto"
    memory_budget: Optional[Union[str, int]] = None
    calibration: Optional[CalibrationConfig] = None

    @field_validator("identity_prior", mode="before")
    @classmethod
    def _check_prior(cls, value: Any) -> Union[float, str]:
        return identity_prior_value(value)


def identity_prior_value(value: Any) -> Union[float, str]:
    """A valid ``identity_prior``: ``"auto"`` or a finite number >= 0 (as float); else ValueError."""
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return float(value)
    raise ValueError(f"identity_prior {value!r} is neither a finite number >= 0 nor 'auto'")


class InputModelDefinition(StrictModel):
    model: str
    parameters: Optional[Parameters] = None
    calibration: Optional[CalibrationConfig] = None
    transfer: Optional[TransferConfig] = None


class InputSliceDefinition(StrictModel):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    @field_validator("layer_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSliceDefinition(StrictModel):
    sources: list[InputSliceDefinition] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None


DTYPES = ("float32", "float16", "bfloat16", "float64")


class MergeConfig(StrictModel):
    """A whole merge: mergekit's keys (``models``/``slices``, ``base_model``, ``merge_method``,
    ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``) plus ``calibration``."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModelDefinition]] = None
    slices: Optional[list[OutputSliceDefinition]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    calibration: Optional[CalibrationConfig] = None
    name: Optional[str] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _check_dtype(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _one_input_form(self) -> "MergeConfig":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (and not an empty list)")
        return self

    def referenced_models(self) -> list[str]:
        """Every model path the config names, in first-mention order (base first)."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
            if m.transfer:
                seen[m.transfer.source_base] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)


# ---------------------------------------------------------------------------------------------
# Loading and error formatting


def _location(loc: tuple[Any, ...], data: Any) -> str:
    """``('models', 0, 'parametrs')`` -> ``models[0]`` (plus the model path when known)."""
    parts: list[str] = []
    node = data
    model_name = None
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
        if isinstance(node, dict) and isinstance(node.get("model"), str):
            model_name = node["model"]
    where = ".".join(parts) if parts else "top level"
    if model_name:
        where += f" (model '{model_name}')"
    return where


_BLOCK_FIELDS: dict[str, type[BaseModel]] = {
    "models": InputModelDefinition,
    "slices": OutputSliceDefinition,
    "sources": InputSliceDefinition,
    "calibration": CalibrationConfig,
    "transfer": TransferConfig,
}


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(candidates)}"


def _format_validation_error(err: ValidationError, data: Any, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    # pydantic reports union members as extra loc items (e.g. 'str', 'list[...]'); keep the config path only
    clean: list[Any] = []
    node = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            clean.append(item)
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            clean.append(item)
            node = node[item]
        elif kind == "extra_forbidden" and item == loc[-1]:
            clean.append(item)
        elif kind == "missing" and item == loc[-1]:
            clean.append(item)
    loc = tuple(clean)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = loc[:-1]
        block_name = next((p for p in reversed(parent) if isinstance(p, str)), None)
        block = _BLOCK_FIELDS.get(block_name or "", MergeConfig)
        fields = list(block.model_fields)
        where = _location(parent, data)
        return f"{source}: unknown key '{key}' in {where}{_suggest(key, fields)}"
    if kind == "missing":
        key = str(loc[-1])
        return f"{source}: missing required key '{key}' in {_location(loc[:-1], data)}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{source}: invalid value at {_location(loc, data)}: {msg}"


def _parameter_blocks(config: MergeConfig) -> list[tuple[str, Optional[Parameters]]]:
    """Every ``parameters:`` block of ``config`` with its location, e.g. ``models[1].parameters``."""
    blocks: list[tuple[str, Optional[Parameters]]] = [("parameters", config.parameters)]
    for i, m in enumerate(config.models or []):
        blocks.append((f"models[{i}].parameters (model '{m.model}')", m.parameters))
    for i, s in enumerate(config.slices or []):
        blocks.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            blocks.append((f"slices[{i}].sources[{j}].parameters (model '{src.model}')", src.parameters))
    return blocks


def _check_parameter_values(config: MergeConfig, source: str) -> None:
    """Refuse empty lists (a gradient or a list of conditions with no element): mergekit would
    silently fall through to another level or the default; here it is an error."""
    for where, params in _parameter_blocks(config):
        for name, setting in (params or {}).items():
            items = setting if isinstance(setting, list) else [setting]
            values = [c.value if isinstance(c, ConditionalParameter) else c for c in items]
            if not items or any(isinstance(v, list) and not v for v in values):
                raise ConfigError(
                    f"{source}: invalid value at {where.replace('parameters', f'parameters.{name}', 1)}: "
                    "an empty list is not a parameter value (give a scalar or a gradient of at least one value)"
                )


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Validate an already-parsed YAML document; ConfigError names ``source`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (merge_method, models, ...)")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data, source)) from None
    _check_parameter_values(config, source)
    return config


def load_config_text(text: str, source: str = "config") -> MergeConfig:
    """Parse YAML text into a :class:`MergeConfig`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(err, yaml.constructor.ConstructorError):  # e.g. !!python/object: never built
            raise ConfigError(f"{source}: unsupported YAML tag{where}: {problem} (only plain YAML values are read)") from None
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None
    return parse_config(data, source)


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{p}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{p}' is a directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{p}': {err}") from None
    return load_config_text(text, str(p))
