"""Parameter resolution: scalars, gradients and ``{filter, value}`` conditions, with mergekit's rules.

* scalar: used as is;
* list of scalars (a *gradient*): numeric values are interpolated linearly at ``t`` in [0, 1]
  (``t = i / (n - 1)`` for layer ``i`` of an ``n``-layer slice, ``t = 0`` for non-layer tensors);
  booleans and strings pick the element at ``int(t * (len - 1))``;
* ``{filter, value}`` or a list of them: the first whose ``filter`` is a substring of the tensor name
  (or is missing / ``"*"``) applies; its value may itself be a gradient.

Precedence (highest first): the model entry's (or slice source's) parameters, the slice's, the
global ``parameters:``. Global-scope method parameters come from the slice and global levels only.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable, Mapping, Optional

from mergekit_bico.config import ConditionalParameter
from mergekit_bico.errors import ConfigError

_NOT_SET = object()


def evaluate_setting(setting: Any, tensor_name: str, t: float, convert: Callable[[Any], Any]) -> Any:
    """Resolve one parameter setting for ``tensor_name`` at gradient position ``t``.

    Returns ``_NOT_SET`` when no condition matches (so lower-precedence levels are consulted).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, dict):
        setting = [_condition(setting)]
    if isinstance(setting, (bool, int, float, str)):
        return convert(setting)
    if isinstance(setting, list):
        if not setting:
            return _NOT_SET
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [convert(e) for e in setting]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return convert((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, ConditionalParameter):
                cond = _condition(cond)
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(cond.value, tensor_name, t, convert)
        return _NOT_SET
    raise ConfigError(f"unexpected parameter setting {setting!r}")


def _condition(raw: Any) -> ConditionalParameter:
    """A ``{filter, value}`` mapping given as a plain dict (library callers); ConfigError when malformed."""
    from pydantic import ValidationError

    try:
        return ConditionalParameter.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "condition"
        raise ConfigError(f"invalid parameter condition {raw!r}: {where}: {first['msg']}") from None


def gradient_lengths(setting: Any) -> list[int]:
    """Lengths of every gradient (list of scalars) in one setting, conditions' values included."""
    if isinstance(setting, ConditionalParameter):
        return gradient_lengths(setting.value)
    if isinstance(setting, list):
        if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
            return [len(setting)]
        return [n for e in setting for n in gradient_lengths(e)]
    if isinstance(setting, dict) and "value" in setting:
        return gradient_lengths(setting["value"])
    return []


def check_gradients(params: Optional[Mapping[str, Any]], *, layers: int, where: str, span: str) -> None:
    """ConfigError for a gradient with more values than ``layers`` (the layers it is spread over).

    A gradient of ``n`` values is sampled at ``t = i / (layers - 1)``; with more values than layers
    some of them fall between samples and are never used, which is a mistake in the config (the
    list was written for another model or slice). ``span`` names what has ``layers`` layers.
    """
    cap = max(1, layers)
    for name, setting in (params or {}).items():
        for n in gradient_lengths(setting):
            if n > cap:
                raise ConfigError(
                    f"parameter '{name}' in {where} is a gradient of {n} values but {span} has {layers} "
                    f"layer{'s' if layers != 1 else ''}; give at most {cap} value{'s' if cap != 1 else ''} "
                    "(one per layer) or a scalar"
                )


def resolve(
    name: str,
    convert: Callable[[Any], Any],
    levels: Iterable[Optional[Mapping[str, Any]]],
    *,
    tensor_name: str,
    t: float,
) -> Any:
    """First value for ``name`` found in ``levels`` (highest precedence first), or ``_NOT_SET``.

    ``convert`` coerces and checks one scalar (gradient endpoints are converted before interpolation).
    """
    for level in levels:
        if level and name in level:
            value = evaluate_setting(level[name], tensor_name, t, convert)
            if value is not _NOT_SET:
                return value
    return _NOT_SET


def is_set(value: Any) -> bool:
    return value is not _NOT_SET


def check_known(keys: Iterable[str], known: Iterable[str], *, method: str, where: str) -> None:
    """ConfigError for a parameter name the method does not take, with a suggestion."""
    known = sorted(set(known))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; it takes: {', '.join(known)}" if known else "; it takes none")
            raise ConfigError(f"unknown parameter '{key}' for merge_method '{method}' in {where}{hint}")


def finite(value: Any) -> bool:
    return not (isinstance(value, float) and (math.isnan(value) or math.isinf(value)))
