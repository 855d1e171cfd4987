"""Merge-method registry: parameter specs, method records, lookup.

A merge method is a pure tensor function plus a declared parameter spec. No
method opens a file; the planner resolves parameters (filters, gradients,
precedence) and hands each method the tensors of one output weight.

Registering a method from another module is a single call::

    from mergekit_bico.methods.registry import MergeMethod, ParamSpec, register

    register(MergeMethod(name="fisher", summary="...", base="none",
                         params=(ParamSpec("weight", float, "model", default=1.0),),
                         uses_rng=False, fn=my_fisher_fn))

Contract of ``MergeMethod.fn`` (called by :meth:`MergeMethod.merge`)::

    fn(tensors, base, params, generator=generator) -> torch.Tensor

* ``tensors``: the input tensors in config order, all the same shape and dtype
  (the computation dtype), floating point; for ``base="required"`` methods the
  base model's entry is not among them.
* ``base``: the base tensor (same shape/dtype) or ``None``.
* ``params``: ``{name: value}``; global parameters are scalars, model-scope
  parameters are tuples aligned with ``tensors``. Values are already validated
  and defaults filled.
* ``generator`` (keyword, only for ``uses_rng`` methods): the planner's
  ``torch.Generator`` seeded from (seed, tensor name), see :func:`make_generator`;
  may be ``None`` (torch's global RNG is then used).
* ``stats`` (keyword, only for ``needs_stats`` methods): what the executor
  passes as ``merge(..., stats=...)``, one entry per input tensor.

The result has the tensors' shape; its dtype is the computation dtype.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from mergekit_bico.dtypes import torch

from mergekit_bico.errors import ConfigError, TensorMismatchError

__all__ = [
    "ParamSpec",
    "MergeMethod",
    "REGISTRY",
    "register",
    "get_method",
    "list_methods",
    "make_generator",
    "MERGEKIT_UNSUPPORTED",
    "check_density",
    "check_finite",
    "check_unit_interval",
]

_MISSING = object()

# Methods that mergekit 0.1.5 registers but mergekit-bico does not implement;
# only used to give a clearer error message.
MERGEKIT_UNSUPPORTED = frozenset(
    {
        "slerp",
        "nuslerp",
        "multislerp",
        "model_stock",
        "sce",
        "karcher",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    }
)

_TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


# --------------------------------------------------------------------------- checks
# A check returns an error text (completing "... <param> = <value> <where> ___")
# for a bad value, or None when the value is fine.


def check_finite(value: Any) -> str | None:
    if value is None:
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    return None


def check_density(value: Any) -> str | None:
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        return "must be in (0, 1]"
    return None


def check_unit_interval(value: Any) -> str | None:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return "must be in [0, 1]"
    return None


# ------------------------------------------------------------------------ coercion


class _CoerceError(ValueError):
    pass


def _coerce_bool(value: Any) -> bool:
    # Same lax rules as pydantic's bool (what mergekit 0.1.5 uses).
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_STRINGS:
            return True
        if text in _FALSE_STRINGS:
            return False
    raise _CoerceError("must be a boolean (true or false)")


def _coerce_float(value: Any) -> float:
    # bool/int/float/numeric string, like pydantic's lax float (YAML 1.1 reads
    # "1e-3" as a string, mergekit accepts it as a number).
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _CoerceError("must be a number")


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
    raise _CoerceError("must be an integer")


def _coerce_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _CoerceError("must be a string")


_COERCERS: dict[type, Callable[[Any], Any]] = {
    bool: _coerce_bool,
    float: _coerce_float,
    int: _coerce_int,
    str: _coerce_str,
}


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    ``scope="model"``: one value per input model entry (mergekit's per-input /
    non-base parameters); ``scope="global"``: one value per merge.
    ``required`` parameters have no default. A non-required parameter whose
    default is ``None`` may be left unset (``None``). ``check`` returns an error
    text for a bad (already coerced) value. ``coerce``, when given, replaces the
    built-in conversion for ``type`` (raise ``ValueError`` with the error text).
    """

    name: str
    type: type
    scope: Literal["model", "global"]
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    coerce: Callable[[Any], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.scope not in ("model", "global"):
            raise ValueError(f"ParamSpec {self.name!r}: bad scope {self.scope!r}")
        if self.coerce is None and self.type not in _COERCERS:
            raise ValueError(f"ParamSpec {self.name!r}: unsupported type {self.type!r}")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (see the module docstring for ``fn``)."""

    name: str
    summary: str
    base: Literal["required", "optional", "none"]
    params: tuple[ParamSpec, ...]
    uses_rng: bool
    fn: Callable[..., torch.Tensor]
    # Cross-parameter check run per input entry on its resolved model-scope +
    # global values; returns an error text or None.
    check_entry: Callable[[Mapping[str, Any]], str | None] | None = field(
        default=None, compare=False
    )
    # Check of one output tensor's whole resolved parameter set (model-scope values as
    # tuples, as ``fn`` gets them), e.g. weights that sum to zero; returns an error text or None.
    # The planner runs it for every output tensor before anything is merged.
    check_params: Callable[[Mapping[str, Any]], str | None] | None = field(
        default=None, compare=False
    )
    # The most inputs (besides a required base) the method takes, if limited.
    max_inputs: int | None = None
    # Methods that need per-input statistics (e.g. Fisher) get ``stats=`` from the
    # executor: one entry per input tensor (or None), passed on to ``fn``.
    needs_stats: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.base not in ("required", "optional", "none"):
            raise ValueError(f"method {self.name!r}: bad base role {self.base!r}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: duplicate parameter names")

    # ------------------------------------------------------------------ params
    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    def validate_value(self, spec: ParamSpec, value: Any, *, where: str = "") -> Any:
        """Coerce ``value`` to ``spec.type`` and run ``spec.check``.

        Raises ConfigError on one line, e.g. ``ties: parameter 'density' = 1.5
        for model './m' on 'model.layers.0.mlp.up_proj.weight' must be in (0, 1]``.
        ``None`` is accepted (and returned) only for optional parameters whose
        default is ``None``.
        """
        if value is None:
            if not spec.required and spec.default is None:
                return None
            self._fail(spec, value, where, "must be set" if spec.required else
                       f"must be a {spec.type.__name__}")
        try:
            coerced = (spec.coerce or _COERCERS[spec.type])(value)
        except (ValueError, TypeError) as exc:
            self._fail(spec, value, where, str(exc) or f"must be a {spec.type.__name__}")
        if spec.check is not None and coerced is not None:
            problem = spec.check(coerced)
            if problem:
                self._fail(spec, value, where, problem)
        return coerced

    def _fail(self, spec: ParamSpec, value: Any, where: str, problem: str) -> None:
        where = f" {where.strip()}" if where and where.strip() else ""
        raise ConfigError(
            f"{self.name}: parameter '{spec.name}' = {value!r}{where} {problem}"
        )

    def resolve(
        self,
        model_params: Sequence[Mapping[str, Any]],
        global_params: Mapping[str, Any],
        *,
        tensor_name: str = "",
    ) -> dict[str, Any]:
        """Fill defaults, validate, and pack values for ``fn``.

        Returns ``{name: value}`` with model-scope values as tuples aligned with
        ``model_params``. Unknown keys are ignored (the planner rejects unknown
        parameter names when reading the config).
        """
        on = f" on '{tensor_name}'" if tensor_name else ""
        out: dict[str, Any] = {}
        for spec in self.global_params:
            value = global_params.get(spec.name, _MISSING)
            if value is _MISSING:
                if spec.required:
                    raise ConfigError(
                        f"{self.name}: missing required parameter '{spec.name}'{on}"
                    )
                value = spec.default
            out[spec.name] = self.validate_value(spec, value, where=on)
        for spec in self.model_params:
            values = []
            for index, entry in enumerate(model_params):
                value = entry.get(spec.name, _MISSING)
                if value is _MISSING:
                    if spec.required:
                        raise ConfigError(
                            f"{self.name}: missing required parameter '{spec.name}'"
                            f" for input {index}{on}"
                        )
                    value = spec.default
                values.append(
                    self.validate_value(spec, value, where=f"for input {index}{on}")
                )
            out[spec.name] = tuple(values)
        if self.check_entry is not None:
            for index in range(len(model_params)):
                entry = {k: v for k, v in out.items()}
                for spec in self.model_params:
                    entry[spec.name] = out[spec.name][index]
                problem = self.check_entry(entry)
                if problem:
                    raise ConfigError(f"{self.name}: {problem} for input {index}{on}")
        if self.check_params is not None:
            problem = self.check_params(out)
            if problem:
                where = f" (tensor '{tensor_name}')" if tensor_name else ""
                raise ConfigError(f"{self.name}: {problem}{where}")
        return out

    # ------------------------------------------------------------------- merge
    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        model_params: Sequence[Mapping[str, Any]],
        global_params: Mapping[str, Any],
        *,
        tensor_name: str,
        generator: torch.Generator | None = None,
        stats: Sequence[Any] | None = None,
    ) -> torch.Tensor:
        """Merge the inputs of one output tensor, as mergekit 0.1.5 does.

        Mirrors mergekit's per-tensor adapter: if any input (base included) is
        not floating point, all inputs must be equal and a copy of the first is
        returned; shapes must match (TensorMismatchError); inputs are promoted
        to a common dtype (``torch.promote_types``); a base-required method
        with no non-base input returns the base. ``base`` is ignored by methods
        whose base role is ``"none"``.
        """
        tensors = list(tensors)
        if len(model_params) != len(tensors):
            raise ValueError(
                f"{self.name}: {len(tensors)} tensors but {len(model_params)} "
                f"model parameter sets for '{tensor_name}'"
            )
        if self.base == "none":
            base = None
        if self.base == "required" and base is None:
            raise ConfigError(
                f"merge_method '{self.name}' requires base_model (tensor '{tensor_name}')"
            )
        everything = tensors + ([base] if base is not None else [])
        if not everything:
            raise ConfigError(
                f"merge_method '{self.name}' needs at least one input model"
                f" (tensor '{tensor_name}')"
            )
        if self.max_inputs is not None and len(tensors) > self.max_inputs:
            raise ConfigError(
                f"merge_method '{self.name}' takes at most {self.max_inputs} input "
                f"model(s), got {len(tensors)} (tensor '{tensor_name}')"
            )
        shapes = [tuple(t.shape) for t in everything]
        if any(s != shapes[0] for s in shapes[1:]):
            listed = [tuple(t.shape) for t in tensors]
            extra = f", base {tuple(base.shape)}" if base is not None else ""
            raise TensorMismatchError(
                f"shape mismatch on tensor '{tensor_name}': inputs {listed}{extra}"
            )
        if not all(t.is_floating_point() for t in everything):
            # Integer / bool buffers are copied, never merged.
            first = everything[0]
            for other in everything[1:]:
                if other.dtype != first.dtype or not torch.equal(other, first):
                    raise TensorMismatchError(
                        f"non-floating tensor '{tensor_name}' differs between "
                        "input models; it cannot be merged"
                    )
            return first.clone()

        dtype = everything[0].dtype
        for t in everything[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        tensors = [t.to(dtype) for t in tensors]
        if base is not None:
            base = base.to(dtype)

        params = self.resolve(model_params, global_params, tensor_name=tensor_name)
        if self.base == "required" and not tensors:
            return base
        if not tensors:
            raise ConfigError(
                f"merge_method '{self.name}' needs at least one input model"
                f" (tensor '{tensor_name}')"
            )
        extra: dict[str, Any] = {}
        if self.uses_rng:
            extra["generator"] = generator
        if self.needs_stats:
            extra["stats"] = stats
        with torch.no_grad():
            return self.fn(tensors, base, params, **extra)


# ------------------------------------------------------------------------ registry

REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry; a duplicate name is a programming error."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"register() expects a MergeMethod, got {type(method).__name__}")
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; ConfigError with a suggestion when unknown."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        pass
    known = sorted(REGISTRY)
    text = str(name)
    if text in MERGEKIT_UNSUPPORTED:
        raise ConfigError(
            f"merge_method {text!r} is a mergekit method that mergekit-bico does not "
            f"implement; known: {', '.join(known)}"
        )
    close = difflib.get_close_matches(text, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown merge_method {text!r}; {hint}known: {', '.join(known)}")


def list_methods() -> list[MergeMethod]:
    """All registered methods, sorted by name."""
    return [REGISTRY[name] for name in sorted(REGISTRY)]


def make_generator(
    seed: int, tensor_name: str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator seeded from ``(seed, tensor_name)`` only (SHA-256, 63 bits).

    Random methods (DARE, DELLA) then give the same result for a tensor however
    tensors are ordered, batched or parallelised, and different tensors get
    independent streams. Use a CPU generator for results that do not depend on
    the device (the sparsifiers draw on the generator's device and move).
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator
