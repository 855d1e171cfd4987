"""Property-based tests (hypothesis) of the config loader, the parameter resolver and the planner.

* configs valid by construction (a grammar of what the schema and the methods accept) parse and
  plan, and every resolved parameter equals what an independent model of mergekit's rules
  (precedence model > slice > global, gradients, first matching ``{filter, value}``) gives;
* each of a list of known-invalid mutations of a valid config is refused with a one-line
  ConfigError (or, for paths, another MergeKitBicoError): never accepted, never another exception;
* arbitrary YAML text and arbitrary nested documents built from the schema's vocabulary: only
  MergeKitBicoError or success, and whatever is accepted satisfies the invariants of a plan.

A few hundred cases in ``make test``; ``@pytest.mark.slow`` runs the same properties on more than
a thousand cases each (``make bench``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mergekit_bico.config import DTYPES, MergeConfig, load_config_text, parse_config
from mergekit_bico.errors import ConfigError, MergeKitBicoError
from mergekit_bico.methods import get_method, list_methods
from mergekit_bico.params import _NOT_SET, evaluate_setting
from mergekit_bico.plan import build_plan

N_LAYERS = 2  # the tiny models of conftest's llama_family
FILTERS = ["mlp", "self_attn", "layers.0", "layers.1", "norm", "embed", "q_proj", "no-such-tensor", "*"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def models(llama_family) -> dict[str, str]:
    return {k: str(llama_family[k]) for k in ("base", "ft1", "ft2")}


# ---------------------------------------------------------------------------------------------
# An independent model of parameter resolution (mergekit's rules, written from its docs)


def _interp(values: list[float], t: float) -> float:
    if len(values) == 1:
        return values[0]
    x = t * (len(values) - 1)
    i = min(int(math.floor(x)), len(values) - 2)
    return values[i] + (x - i) * (values[i + 1] - values[i])


def oracle_value(setting: Any, tensor: str, t: float) -> Any:
    """The value a raw (as written in YAML) setting gives ``tensor`` at gradient position ``t``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, bool) or isinstance(setting, (int, float)):
        return float(setting)
    if isinstance(setting, list) and setting and not isinstance(setting[0], dict):
        return _interp([float(v) for v in setting], t)
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor:
            return oracle_value(cond["value"], tensor, t)
    return _NOT_SET


def oracle(levels: list[Optional[dict]], name: str, tensor: str, t: float, default: Any) -> Any:
    for level in levels:
        if level and name in level:
            v = oracle_value(level[name], tensor, t)
            if v is not _NOT_SET:
                return v
    return default


def t_of(tensor: str) -> float:
    m = re.search(r"\.layers\.(\d+)\.", tensor)
    return int(m.group(1)) / (N_LAYERS - 1) if m else 0.0


# ---------------------------------------------------------------------------------------------
# Valid configs by construction

finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False)
positive = st.floats(0.05, 3, allow_nan=False)
density = st.floats(0.05, 1.0, allow_nan=False)


def setting(value: st.SearchStrategy, *, fallback: bool) -> st.SearchStrategy:
    """A scalar, a gradient (1..N_LAYERS values) or a list of ``{filter, value}`` conditions
    (ending with an unfiltered one when ``fallback``)."""
    scalar_or_gradient = st.one_of(value, st.lists(value, min_size=1, max_size=N_LAYERS))
    cond = st.fixed_dictionaries({"filter": st.sampled_from(FILTERS), "value": scalar_or_gradient})
    conds = st.lists(cond, min_size=0, max_size=3)
    if fallback:
        conds = st.tuples(conds, scalar_or_gradient).map(lambda p: p[0] + [{"value": p[1]}])
    else:
        conds = conds.filter(bool)
    return st.one_of(scalar_or_gradient, conds, cond if not fallback else st.nothing())


METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "breadcrumbs")


@st.composite
def valid_models_config(draw, models: dict[str, str]) -> dict:
    method = draw(st.sampled_from(METHODS))
    weight = positive if method == "linear" else finite  # linear normalizes: sums stay > 0
    has_density = method != "linear"
    entries = []
    for name in draw(st.lists(st.sampled_from(["ft1", "ft2"]), min_size=1, max_size=3)):
        params: dict[str, Any] = {}
        if draw(st.booleans()):
            params["weight"] = draw(setting(weight, fallback=True))
        if has_density and draw(st.booleans()):
            params["density"] = draw(setting(density, fallback=False))
        entry: dict[str, Any] = {"model": models[name]}
        if params or draw(st.booleans()):
            entry["parameters"] = params
        entries.append(entry)
    glob: dict[str, Any] = {"weight": draw(setting(weight, fallback=True))}  # the fallback of every entry
    if has_density and draw(st.booleans()):
        glob["density"] = draw(setting(density, fallback=True))
    if draw(st.booleans()):
        glob["normalize"] = draw(st.booleans())
    if method != "linear" and draw(st.booleans()):
        glob["lambda"] = draw(setting(finite, fallback=True))
    cfg: dict[str, Any] = {"merge_method": method, "models": entries, "parameters": glob}
    if method != "linear":
        cfg["base_model"] = models["base"]
    if draw(st.booleans()):
        cfg["dtype"] = draw(st.sampled_from(DTYPES))
    return cfg


@st.composite
def valid_slices_config(draw, models: dict[str, str]) -> dict:
    method = draw(st.sampled_from(["passthrough", "linear"]))
    slices = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.integers(0, N_LAYERS - 1))
        b = draw(st.integers(a + 1, N_LAYERS))
        length = b - a
        n_sources = 1 if method == "passthrough" else draw(st.integers(1, 2))
        sources = []
        for _ in range(n_sources):
            start = draw(st.integers(0, N_LAYERS - length))
            src: dict[str, Any] = {"model": models[draw(st.sampled_from(["ft1", "ft2"]))], "layer_range": [start, start + length]}
            key = "scale" if method == "passthrough" else "weight"
            value = st.lists(positive, min_size=1, max_size=length) | positive
            src["parameters"] = {key: draw(value)}
            sources.append(src)
        slices.append({"sources": sources})
    return {"merge_method": method, "slices": slices}


def _check_resolution(cfg: dict, plan) -> None:
    """Every resolved model / global parameter of every job equals the oracle's value."""
    method = get_method(cfg["merge_method"])
    assert [e.path for e in plan.entries] == [m["model"] for m in cfg["models"]]  # none is the base
    for job in plan.jobs:
        t = t_of(job.name)
        for i, params in zip(job.entries, job.model_params):
            raw = cfg["models"][i].get("parameters") or {}
            for spec in method.model_params:
                want = oracle([raw, cfg.get("parameters")], spec.name, job.name, t, spec.default)
                got = params[spec.name]
                assert math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12), (job.name, spec.name, got, want)
        for spec in method.global_params:
            want = oracle([cfg.get("parameters")], spec.name, job.name, t, spec.default)
            got = job.global_params[spec.name]
            if isinstance(spec.default, bool) or spec.type is bool:
                assert bool(got) == bool(want), (job.name, spec.name)
            elif spec.type is float:
                assert math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12), (job.name, spec.name, got, want)


def _plan_invariants(plan) -> None:
    """What any accepted plan must satisfy, whatever config it came from."""
    assert plan.jobs
    for job in plan.jobs:
        assert len(job.inputs) == len(job.model_params) == len(job.entries) >= 1
        if job.method.base == "required":
            assert job.base is not None
        for params in [*job.model_params, job.global_params]:
            for name, value in params.items():
                if isinstance(value, float):
                    assert math.isfinite(value), (job.name, name, value)
                if name == "density":
                    assert 0 < value <= 1
        job.method.resolve(job.model_params, job.global_params, tensor_name=job.name)  # accepted again


def _valid_models(models, cfg):
    text = yaml.safe_dump(cfg)
    config = load_config_text(text, "fuzz.yml")  # through YAML, as a user's file
    plan = build_plan(config)
    assert len(plan.jobs) == 21
    _check_resolution(yaml.safe_load(text), plan)
    _plan_invariants(plan)


def _valid_slices(models, cfg):
    plan = build_plan(load_config_text(yaml.safe_dump(cfg), "fuzz.yml"))
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
    assert plan.out_num_layers == layers
    _plan_invariants(plan)


def test_valid_configs_parse_plan_and_resolve_like_mergekit(models):
    @FAST
    @given(valid_models_config(models))
    def check(cfg):
        _valid_models(models, cfg)

    check()


def test_valid_slice_configs_plan(models):
    @FAST
    @given(valid_slices_config(models))
    def check(cfg):
        _valid_slices(models, cfg)

    check()


@pytest.mark.slow
def test_valid_configs_many(models):
    @SLOW
    @given(valid_models_config(models) | valid_slices_config(models))
    def check(cfg):
        (_valid_slices if "slices" in cfg else _valid_models)(models, cfg)

    check()


# ---------------------------------------------------------------------------------------------
# Known-invalid mutations

identifier = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
TOP_KEYS = set(MergeConfig.model_fields)
MODEL_KEYS = {"model", "parameters", "calibration", "transfer"}


def _all_params(cfg: dict) -> list[dict]:
    out = [cfg.setdefault("parameters", {})]
    for m in cfg.get("models") or []:
        out.append(m.setdefault("parameters", {}))
    return out


Mutation = Callable[[Any, dict], str]  # (draw, cfg) -> expected ConfigError text fragment; edits cfg


def m_unknown_top_key(draw, cfg):
    key = draw(identifier.filter(lambda k: k not in TOP_KEYS))
    cfg[key] = draw(st.integers() | st.text(max_size=5))
    return f"unknown key '{key}'"


def m_unknown_model_key(draw, cfg):
    key = draw(identifier.filter(lambda k: k not in MODEL_KEYS))
    cfg["models"][draw(st.integers(0, len(cfg["models"]) - 1))][key] = 1
    return f"unknown key '{key}'"


def m_unknown_parameter(draw, cfg):
    known = {p.name for p in get_method(cfg["merge_method"]).params}
    key = draw(identifier.filter(lambda k: k not in known and k != "source_base"))
    draw(st.sampled_from(_all_params(cfg)))[key] = 1.0
    return f"unknown parameter '{key}'"


def m_bad_density(draw, cfg):
    if cfg["merge_method"] == "linear":
        return m_bad_weight(draw, cfg)
    bad = draw(st.sampled_from([0.0, -0.5, 1.0001, 2.0, math.nan, math.inf, -math.inf]))
    params = draw(st.sampled_from(_all_params(cfg)[1:]))
    params["density"] = draw(st.sampled_from([bad, [bad], [0.5, bad], [{"value": bad}]]))
    return "density"


def m_bad_weight(draw, cfg):
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, "abc", "1.2.3", None]))
    draw(st.sampled_from(_all_params(cfg)[1:]))["weight"] = draw(st.sampled_from([bad, [1.0, bad], [{"filter": "*", "value": bad}]]))
    return "weight"


def m_gradient_too_long(draw, cfg):
    n = draw(st.integers(N_LAYERS + 1, 7))
    draw(st.sampled_from(_all_params(cfg)))["weight"] = [0.5] * n
    return f"gradient of {n} values"


def m_empty_list(draw, cfg):
    draw(st.sampled_from(_all_params(cfg)))[draw(st.sampled_from(["weight", "density", "lambda"]))] = draw(
        st.sampled_from([[], [{"value": []}], [{"filter": "mlp", "value": []}, {"value": 1.0}]]))
    return "empty list"


def m_missing_weight(draw, cfg):
    for params in _all_params(cfg):
        params.pop("weight", None)
    if draw(st.booleans()):  # or only conditions that never match
        cfg["parameters"]["weight"] = [{"filter": "no-such-tensor", "value": 1.0}]
    return "missing required parameter 'weight'"


def m_unknown_method(draw, cfg):
    names = {m.name for m in list_methods()}
    cfg["merge_method"] = draw(st.text(min_size=1, max_size=12).filter(lambda s: s not in names))
    return "merge_method"


def m_bad_dtype(draw, cfg):
    cfg[draw(st.sampled_from(["dtype", "out_dtype"]))] = draw(st.text(max_size=10).filter(lambda s: s not in DTYPES))
    return "dtype"


def m_wrong_type(draw, cfg):
    key, value = draw(st.sampled_from([
        ("models", "ft1"), ("models", 3), ("models", {"model": "x"}), ("merge_method", 5), ("merge_method", None),
        ("base_model", [1]), ("parameters", [1, 2]), ("dtype", 16), ("models", []),
    ]))
    cfg[key] = value
    return ""


def m_models_and_slices(draw, cfg):
    if draw(st.booleans()):
        cfg["slices"] = [{"sources": [{"model": cfg["models"][0]["model"], "layer_range": [0, 1]}]}]
    else:
        del cfg["models"]
    return "exactly one of 'models' or 'slices'"


def m_no_base(draw, cfg):
    if cfg["merge_method"] == "linear":
        return m_models_and_slices(draw, cfg)
    del cfg["base_model"]
    return "needs a base_model"


def m_bad_layer_range(draw, cfg):
    a = draw(st.integers(-2, 4))
    b = draw(st.integers(-2, 6))
    assume(not (0 <= a < b <= N_LAYERS))
    model = cfg["models"][0]["model"]
    del cfg["models"]
    cfg["merge_method"] = "passthrough"
    cfg.pop("base_model", None)
    cfg.pop("parameters", None)
    cfg["slices"] = [{"sources": [{"model": model, "layer_range": [a, b]}]}]
    return "layer_range"


def m_missing_model(draw, cfg):
    cfg["models"][0]["model"] = "/nonexistent/" + draw(identifier)
    return "does not exist"


MUTATIONS = [m_unknown_top_key, m_unknown_model_key, m_unknown_parameter, m_bad_density, m_bad_weight,
             m_gradient_too_long, m_empty_list, m_missing_weight, m_unknown_method, m_bad_dtype, m_wrong_type,
             m_models_and_slices, m_no_base, m_bad_layer_range, m_missing_model]


@st.composite
def invalid_config(draw, models: dict[str, str]) -> tuple[dict, str, str]:
    cfg = draw(valid_models_config(models))
    mutation = draw(st.sampled_from(MUTATIONS))
    needle = mutation(draw, cfg)
    return cfg, mutation.__name__, needle


def _refused(cfg: dict, name: str, needle: str) -> None:
    try:
        plan = build_plan(load_config_text(yaml.safe_dump(cfg), "fuzz.yml"))
    except ConfigError as err:
        msg = str(err)
    except MergeKitBicoError as err:
        assert name == "m_missing_model", f"{name}: {type(err).__name__}: {err}"
        msg = str(err)
    else:
        raise AssertionError(f"{name} was accepted: {cfg} -> {len(plan.jobs)} jobs")
    assert msg and "\n" not in msg
    assert needle in msg, (name, msg)


def test_invalid_configs_are_refused(models):
    @FAST
    @given(invalid_config(models))
    def check(case):
        _refused(*case)

    check()


@pytest.mark.slow
def test_invalid_configs_are_refused_many(models):
    @SLOW
    @given(invalid_config(models))
    def check(case):
        _refused(*case)

    check()


# ---------------------------------------------------------------------------------------------
# Garbage in: only MergeKitBicoError or an accepted config that satisfies the invariants

VOCAB = sorted(TOP_KEYS | MODEL_KEYS | {"sources", "layer_range", "weight", "density", "filter", "value", "lambda",
                                        "normalize", "scale", "data", "samples", "source_base", "method"})


def _scalars(models: dict[str, str]) -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8), st.sampled_from(sorted(m.name for m in list_methods())),
        st.sampled_from(list(models.values())), st.sampled_from(list(DTYPES)),
    )


def documents(models: dict[str, str]) -> st.SearchStrategy:
    keys = st.sampled_from(VOCAB) | st.text(max_size=6)
    tree = st.recursive(
        _scalars(models),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=4),
        max_leaves=25,
    )
    return st.dictionaries(keys, tree, max_size=6)


def _any_outcome(doc: Any) -> None:
    try:
        config = parse_config(doc, "fuzz.yml")
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    try:
        plan = build_plan(config)
    except MergeKitBicoError as err:
        assert str(err) and "\n" not in str(err)
        return
    _plan_invariants(plan)


def _any_text(text: str) -> None:
    try:
        load_config_text(text, "fuzz.yml")
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


def test_garbage_documents(models):
    @FAST
    @given(documents(models) | valid_models_config(models).map(_shuffle_types))
    def check(doc):
        _any_outcome(doc)

    check()


def test_garbage_yaml_text():
    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=200) | st.text(alphabet="{}[]:-, \n\t'\"!&*#|>%@`abc01.", max_size=80))
    def check(text):
        _any_text(text)

    check()


@pytest.mark.slow
def test_garbage_many(models):
    @SLOW
    @given(documents(models) | valid_models_config(models).map(_shuffle_types))
    def check(doc):
        _any_outcome(doc)

    check()

    @settings(max_examples=2000, deadline=None)
    @given(st.text(max_size=300))
    def check_text(text):
        _any_text(text)

    check_text()


def _shuffle_types(cfg: dict) -> dict:
    """A valid config with every float turned into its string form (YAML 1.1 reads ``1e-3`` so)."""
    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, float):
            return repr(x)
        return x

    return walk(cfg)


# ---------------------------------------------------------------------------------------------
# The resolver alone


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{v!r} is not a number")
    return float(v)


raw_settings = st.recursive(
    st.one_of(st.floats(-5, 5, allow_nan=False), st.integers(-5, 5), st.booleans(), st.text(max_size=3), st.none()),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["filter", "value", "other"]), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(raw_settings, st.sampled_from(["model.layers.0.mlp.up_proj.weight", "lm_head.weight", ""]), st.floats(0, 1))
def test_resolver_never_crashes(setting, tensor, t):
    """Any setting, however malformed: a value, 'not set', or ConfigError -- nothing else."""
    try:
        evaluate_setting(setting, tensor, t, _float)
    except ConfigError as err:
        assert "\n" not in str(err)


@settings(max_examples=150, deadline=None)
@given(setting(finite, fallback=False) | setting(finite, fallback=True),
       st.sampled_from(["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]),
       st.floats(0, 1))
def test_resolver_matches_the_rules(raw, tensor, t):
    from mergekit_bico.config import ConditionalParameter

    if isinstance(raw, dict):
        parsed: Any = ConditionalParameter.model_validate(raw)
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        parsed = [ConditionalParameter.model_validate(c) for c in raw]
    else:
        parsed = raw
    got = evaluate_setting(parsed, tensor, t, _float)
    want = oracle_value(raw, tensor, t)
    if want is _NOT_SET:
        assert got is _NOT_SET
    else:
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
