"""Merge methods: hand-computed values, RNG reproducibility, top-k, validation.

Expected numbers are worked out from the formulas (see the comments), not by
calling our code. Parity with mergekit itself: benchmarks/parity_methods.py.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_bico.errors import ConfigError, TensorMismatchError
from mergekit_bico.methods import (
    REGISTRY,
    MergeMethod,
    ParamSpec,
    get_method,
    list_methods,
    make_generator,
    register,
)
from mergekit_bico.methods.sparsify import (
    coerce_rescale,
    kth_smallest_key,
    magnitude,
    magnitude_keys,
    select_largest,
    select_smallest,
    select_sorted_range,
)

T = torch.tensor


def merge(name, tensors, base=None, model_params=None, global_params=None, *,
          tensor_name="model.layers.0.mlp.up_proj.weight", generator=None):
    if model_params is None:
        model_params = [{} for _ in tensors]
    return get_method(name).merge(tensors, base, model_params, global_params or {},
                                  tensor_name=tensor_name, generator=generator)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.double(), expected, atol=atol, rtol=0), (actual, expected)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_methods_with_one_line_summaries():
    names = [m.name for m in list_methods()]
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                 "breadcrumbs", "breadcrumbs_ties", "passthrough", "della", "della_linear"):
        assert name in names
    assert names == sorted(names)
    for method in list_methods():
        assert method.summary and "\n" not in method.summary


def test_get_method_suggests_close_name():
    with pytest.raises(ConfigError) as info:
        get_method("tyes")
    text = str(info.value)
    assert "unknown merge_method 'tyes'; did you mean 'ties'?" in text
    assert "known: " in text and "linear" in text and "\n" not in text
    with pytest.raises(ConfigError, match="does not implement"):
        get_method("slerp")


def test_register_is_one_call_and_rejects_duplicates():
    method = MergeMethod(
        name="_test_mean", summary="test", base="none",
        params=(ParamSpec("weight", float, "model", default=1.0),),
        uses_rng=False, fn=lambda tensors, base, params: sum(tensors) / len(tensors),
    )
    try:
        assert register(method) is method
        assert get_method("_test_mean") is method
        close(merge("_test_mean", [T([1.0, 3.0]), T([3.0, 5.0])]), [2.0, 4.0])
        with pytest.raises(ValueError, match="already registered"):
            register(method)
    finally:
        REGISTRY.pop("_test_mean", None)


def test_needs_stats_and_rng_reach_fn():
    seen = {}

    def fn(tensors, base, params, generator=None, stats=None):
        seen.update(generator=generator, stats=stats, weight=params["weight"])
        return tensors[0]

    method = MergeMethod(name="_test_stats", summary="test", base="optional",
                         params=(ParamSpec("weight", float, "model", default=1.0),),
                         uses_rng=True, needs_stats=True, fn=fn)
    gen = make_generator(0, "w")
    method.merge([T([1.0]), T([2.0])], None, [{}, {"weight": "2"}], {}, tensor_name="w",
                 generator=gen, stats=["a", "b"])
    assert seen == {"generator": gen, "stats": ["a", "b"], "weight": (1.0, 2.0)}


# ------------------------------------------------------------------------------- linear


def test_linear_normalized():
    # (1*[1,2] + 3*[3,6]) / 4 = [10,20]/4
    out = merge("linear", [T([1.0, 2.0]), T([3.0, 6.0])],
                model_params=[{"weight": 1}, {"weight": 3}])
    close(out, [2.5, 5.0])


def test_linear_unnormalized_and_negative_weight():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    out = merge("linear", [a, b], model_params=[{"weight": 1}, {"weight": 3}],
                global_params={"normalize": False})
    close(out, [10.0, 20.0])
    # (2*[1,2] - 1*[3,6]) / (2 - 1) = [-1, -2]
    out = merge("linear", [a, b], model_params=[{"weight": 2}, {"weight": -1}])
    close(out, [-1.0, -2.0])


def test_linear_half_inputs_computed_in_float32_returned_in_half():
    # (1*1 + 2*2) / 3 = 5/3 accumulated in float32, rounded once to bf16
    a = torch.full((3,), 1.0, dtype=torch.bfloat16)
    b = torch.full((3,), 2.0, dtype=torch.bfloat16)
    out = merge("linear", [a, b], model_params=[{"weight": 1}, {"weight": 2}])
    assert out.dtype == torch.bfloat16
    close(out, [5.0 / 3.0] * 3, atol=2 ** -7)  # bf16 has 8 significant bits


def test_linear_weights_summing_to_zero_is_an_error_when_normalizing():
    with pytest.raises(ConfigError, match="sum to 0"):
        merge("linear", [T([1.0]), T([2.0])], model_params=[{"weight": 1}, {"weight": -1}])
    out = merge("linear", [T([1.0]), T([2.0])], model_params=[{"weight": 1}, {"weight": -1}],
                global_params={"normalize": False})
    close(out, [-1.0])


def test_linear_ignores_base_and_requires_weight():
    out = merge("linear", [T([4.0])], base=T([100.0]), model_params=[{"weight": 0.5}])
    close(out, [4.0])
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        merge("linear", [T([1.0]), T([2.0])], model_params=[{"weight": 1.0}, {}])


# ---------------------------------------------------------------------- task arithmetic

BASE3 = T([1.0, 1.0, 1.0])
M1 = T([2.0, 0.0, 1.0])  # delta [1, -1, 0]
M2 = T([1.0, 3.0, 2.0])  # delta [0,  2, 1]


def test_task_arithmetic_default_unnormalized():
    # 1*[1,-1,0] + 0.5*[0,2,1] = [1, 0, 0.5]; + base
    out = merge("task_arithmetic", [M1, M2], BASE3, [{"weight": 1.0}, {"weight": 0.5}])
    close(out, [2.0, 1.0, 1.5])


def test_task_arithmetic_normalize_and_lambda():
    # [1, 0, 0.5] / 1.5 = [2/3, 0, 1/3]
    out = merge("task_arithmetic", [M1, M2], BASE3, [{"weight": 1.0}, {"weight": 0.5}],
                {"normalize": True})
    close(out, [1 + 2 / 3, 1.0, 1 + 1 / 3])
    # 2 * [1, 0, 0.5]
    out = merge("task_arithmetic", [M1, M2], BASE3, [{"weight": 1.0}, {"weight": 0.5}],
                {"lambda": 2.0})
    close(out, [3.0, 1.0, 2.0])


def test_task_arithmetic_zero_weight_sum_divisor_is_one():
    # weights sum to 0 -> divisor 1: [1,-1,0] - [0,2,1] = [1,-3,-1]
    out = merge("task_arithmetic", [M1, M2], BASE3, [{"weight": 1.0}, {"weight": -1.0}],
                {"normalize": True})
    close(out, [2.0, -2.0, 0.0])


def test_base_listed_alone_returns_base():
    out = merge("ties", [], BASE3, [])
    assert torch.equal(out, BASE3)


def test_base_required():
    with pytest.raises(ConfigError, match="requires base_model"):
        merge("task_arithmetic", [M1], None, [{"weight": 1.0}])


# --------------------------------------------------------------------------------- TIES

Z4 = torch.zeros(4)
A4 = T([4.0, -1.0, 2.0, -3.0])
B4 = T([-2.0, 3.0, 1.0, -1.0])


def test_ties_hand_computed():
    # density 0.5 of 4 -> k=2.  A: keep 4, -3 -> [4,0,0,-3];  B: keep 3, -2 -> [-2,3,0,0]
    # sum [2,3,0,-3] -> elected signs [+,+,+,-] (0 elects +)
    # agreeing: A [T,F,F,T], B [F,T,F,F] -> mixed [4,3,0,-3]
    # divisor = sum of agreeing weights [1,1,0->1,1]
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    close(merge("ties", [A4, B4], Z4, params), [4.0, 3.0, 0.0, -3.0])


def test_ties_weights_normalize_lambda():
    # weighted deltas: A [4,0,0,-3], B 2*[-2,3,0,0] = [-4,6,0,0]
    # sum [0,6,0,-3] -> signs [+,+,+,-]; A agrees at 0 and 3, B at 1
    # mixed [4,6,0,-3]; divisor [1,2,1,1]
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    close(merge("ties", [A4, B4], Z4, params), [4.0, 3.0, 0.0, -3.0])
    close(merge("ties", [A4, B4], Z4, params, {"normalize": False}), [4.0, 6.0, 0.0, -3.0])
    close(merge("ties", [A4, B4], Z4, params, {"lambda": 0.5}), [2.0, 1.5, 0.0, -1.5])


def test_ties_rescale_l1_and_inverse_density():
    # single model, A sparsified to [4,0,0,-3]: L1 10 -> 7, l1 rescale x10/7
    params = [{"weight": 1.0, "density": 0.5}]
    close(merge("ties", [A4], Z4, params, {"rescale": True}), [40 / 7, 0.0, 0.0, -30 / 7])
    close(merge("ties", [A4], Z4, params, {"rescale": "inverse_density"}), [8.0, 0, 0, -6.0])
    close(merge("ties", [A4], Z4, params, {"rescale": False}), [4.0, 0, 0, -3.0])


def test_ties_keeps_at_least_one_and_int8_mask_accepted():
    # density 0.1 of 4 -> int(0.4)=0 -> max(1, 0) = 1 element: the 4
    params = [{"weight": 1.0, "density": 0.1}]
    close(merge("ties", [A4], Z4, params, {"int8_mask": True}), [4.0, 0, 0, 0])


def test_ties_negative_weight_flips_vote():
    # weighted: A*-1 = [-4,1,-2,3] (density 1), B*1 = [-2,3,1,-1]
    # sum [-6,4,-1,2] -> signs [-,+,-,+]; A agrees [T,T,T,T]; B agrees [T,T,F,F]
    # mixed [-6,4,-2,3]; divisor: A contributes -1 everywhere, B +1 at 0,1
    #   -> [0->1, 0->1, -1, -1]
    params = [{"weight": -1.0}, {"weight": 1.0}]
    close(merge("ties", [A4, B4], Z4, params), [-6.0, 4.0, 2.0, -3.0])


# -------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_hand_computed():
    # n=10, density .5 -> keep 5; gamma .1 -> drop 1 top; n_bot = 10-5-1 = 4
    # |m| ascending: 1,2,3,4 dropped; 5..9 kept; 10 dropped
    m = T([-10.0, 1.0, 9.0, -2.0, 8.0, 3.0, -7.0, 4.0, 6.0, -5.0])
    out = merge("breadcrumbs", [m], torch.zeros(10),
                [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    close(out, [0.0, 0.0, 9.0, 0.0, 8.0, 0.0, -7.0, 0.0, 6.0, -5.0])
    # gamma 0.5: n_top 5, n_bot = max(0, 10-5-5) = 0 -> the 5 smallest are kept
    out = merge("breadcrumbs", [m], torch.zeros(10),
                [{"weight": 1.0, "density": 0.5, "gamma": 0.5}])
    close(out, [0.0, 1.0, 0.0, -2.0, 0.0, 3.0, 0.0, 4.0, 0.0, -5.0])


def test_breadcrumbs_ties_hand_computed():
    # density .5 gamma .25 of 4: keep 2, n_top 1, n_bot 1 -> ranks 1..2 (2nd,3rd smallest)
    # A |.| asc: 1(i1),2(i2),3(i3),4(i0) -> keep i2,i3 -> [0,0,2,-3]
    # B |.| asc: 1(i2),1(i3),2(i0),3(i1) -> tie at 1: stable order i2 then i3 -> keep i3,i0
    #   -> [-2,0,0,-1]
    # sum [-2,0,2,-4] -> signs [-,+,+,-]: A agrees at 2,3; B at 0,3
    # mixed [-2,0,2,-4]; normalize default False for breadcrumbs_ties
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.25}] * 2
    close(merge("breadcrumbs_ties", [A4, B4], Z4, params), [-2.0, 0.0, 2.0, -4.0])


# --------------------------------------------------------------------------- DARE/DELLA


def test_dare_density_one_is_plain_task_arithmetic():
    params = [{"weight": 1.0}, {"weight": 0.5}]
    close(merge("dare_linear", [M1, M2], BASE3, params,
                generator=make_generator(0, "x")), [2.0, 1.0, 1.5])


def test_dare_reproducible_per_seed_and_tensor_name():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g)
    models = [base + torch.randn(64, 64, generator=g) for _ in range(2)]
    params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.5}]

    def run(seed, name):
        return merge("dare_ties", models, base, params, tensor_name=name,
                     generator=make_generator(seed, name))

    first = run(1, "model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(first, run(1, "model.layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(first, run(1, "model.layers.1.self_attn.q_proj.weight"))
    assert not torch.equal(first, run(2, "model.layers.0.self_attn.q_proj.weight"))


def test_dare_rescale_modes():
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(4000)
    model = torch.randn(4000, generator=g)
    params = [{"weight": 1.0, "density": 0.25}]
    gen = lambda: make_generator(5, "w")  # noqa: E731
    plain = merge("dare_linear", [model], base, params, {"rescale": False}, generator=gen())
    kept = plain != 0
    assert torch.equal(plain[kept], model[kept])  # no rescale: kept entries unchanged
    assert 0.2 < kept.float().mean() < 0.3
    # default (mergekit 0.1.5): same mask, scaled so that the L1 norm is preserved
    l1 = merge("dare_linear", [model], base, params, generator=gen())
    factor = model.abs().sum() / model[kept].abs().sum()
    close(l1, model * kept * factor, atol=1e-5)
    close(l1.abs().sum().reshape(1), model.abs().sum().reshape(1), atol=1e-2)
    # paper: divide by density
    inv = merge("dare_linear", [model], base, params, {"rescale": "inverse_density"},
                generator=gen())
    close(inv, model * kept / 0.25, atol=1e-5)


def test_della_probabilities_bracket_density():
    base = torch.zeros(200, 200)
    model = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    params = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]
    out = merge("della_linear", [model], base, params, {"rescale": False},
                generator=make_generator(0, "w"))
    kept = out != 0
    order = model.abs().argsort(dim=1)
    low = kept.gather(1, order[:, :20]).float().mean()   # p ~ 0.3
    high = kept.gather(1, order[:, -20:]).float().mean()  # p ~ 0.7
    assert 0.25 < low < 0.35 and 0.65 < high < 0.75
    with pytest.raises(ConfigError, match="epsilon"):
        merge("della", [model], base, [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}],
              generator=make_generator(0, "w"))


# ------------------------------------------------------------------------- passthrough


def test_passthrough():
    x = T([1.0, -2.0])
    assert torch.equal(merge("passthrough", [x]), x)
    close(merge("passthrough", [x], model_params=[{"scale": 0.5}]), [0.5, -1.0])
    with pytest.raises(ConfigError, match="at most 1"):
        merge("passthrough", [x, x])


# ------------------------------------------------------------------ top-k vs argsort


@pytest.mark.parametrize("seed", range(5))
def test_topk_equals_argsort_for_distinct_magnitudes(seed):
    g = torch.Generator().manual_seed(seed)
    n = 257 * 33
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = ((torch.randperm(n, generator=g) + 1).float() * 1e-3 * signs).reshape(257, 33)
    w = x.abs().reshape(-1)
    assert torch.unique(w).numel() == w.numel()
    for density in (0.01, 0.1, 0.37, 0.5, 0.9, 0.999):
        k = max(1, int(density * w.numel()))
        reference = torch.zeros(w.numel(), dtype=torch.bool)
        reference[torch.argsort(w, descending=True)[:k]] = True
        assert torch.equal(select_largest(magnitude_keys(x), k), reference)
        out = magnitude(x, density)
        assert torch.equal(out.reshape(-1) != 0, reference)
        assert torch.equal(out.reshape(-1)[reference], x.reshape(-1)[reference])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1000, 70_000])
def test_topk_ties_keep_what_mergekits_sort_keeps(seed, n):
    """Many equal magnitudes: the kept set is the one mergekit 0.1.5's calls select --
    ``torch.argsort(|x|, descending=True)[:k]`` (TIES) and ``torch.sort(|x|).indices[a:b]``
    (breadcrumbs) -- whose order among equal values is not the index order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (n,), generator=g).float() * 0.25  # many ties, zeros
    w = x.abs()
    keys = magnitude_keys(x)
    for k in (0, 1, 7, n // 10, n // 3, n // 2, n - 1, n):
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.argsort(w, descending=True)[:k]] = True
        assert torch.equal(select_largest(keys, k, "sort"), ref), k
    order = torch.sort(w).indices
    for a, b in ((0, n // 2), (n // 10, n // 2), (n // 3, n), (0, n), (5, 5)):
        ref = torch.zeros(n, dtype=torch.bool)
        ref[order[a:b]] = True
        assert torch.equal(select_sorted_range(keys, a, b, "sort"), ref), (a, b)
    if n > 10_000:  # here mergekit's unstable sort differs from the lowest-index choice
        stable = torch.zeros(n, dtype=torch.bool)
        stable[torch.sort(w, descending=True, stable=True).indices[: n // 3]] = True
        assert not torch.equal(select_largest(keys, n // 3, "sort"), stable)


@pytest.mark.parametrize("seed", range(3))
def test_topk_ties_by_index_follow_a_stable_sort(seed):
    """tie_break: index (default): the first k of a stable sort, without sorting."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (1000,), generator=g).float() * 0.25  # many ties, zeros
    w = x.abs()
    keys = magnitude_keys(x)
    for k in (0, 1, 7, 100, 333, 500, 999, 1000):
        ref = torch.zeros(1000, dtype=torch.bool)
        ref[torch.sort(w, descending=True, stable=True).indices[:k]] = True
        assert torch.equal(select_largest(keys, k), ref)
        ref = torch.zeros(1000, dtype=torch.bool)
        ref[torch.sort(w, stable=True).indices[:k]] = True
        assert torch.equal(select_smallest(keys, k), ref)
    order = torch.sort(w, stable=True).indices
    for a, b in ((0, 500), (100, 500), (333, 1000), (5, 5)):
        ref = torch.zeros(1000, dtype=torch.bool)
        ref[order[a:b]] = True
        assert torch.equal(select_sorted_range(keys, a, b), ref), (a, b)


def test_clean_cuts_need_no_sort(monkeypatch):
    """Distinct magnitudes at the cut: radix select alone (the sort is never called)."""
    from mergekit_bico.methods import sparsify

    monkeypatch.setattr(sparsify, "_sorted_positions", lambda *a, **k: pytest.fail("sorted"))
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    keys = magnitude_keys(x)
    ref = torch.zeros(10_000, dtype=torch.bool)
    ref[torch.topk(x.abs(), 123).indices] = True
    assert torch.equal(select_largest(keys, 123, "sort"), ref)
    assert int(select_sorted_range(keys, 100, 9000, "sort").sum()) == 8900


def test_kth_smallest_key_matches_kthvalue_and_handles_specials():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.exp2(torch.randint(-30, 30, (5000,), generator=g))
    x[:3] = torch.tensor([0.0, -0.0, float("inf")])
    keys = magnitude_keys(x)
    w = x.abs()
    for k in (1, 2, 3, 100, 2500, 4999, 5000):
        key = kth_smallest_key(keys, k)
        value = torch.tensor([key], dtype=torch.int32).view(torch.float32).item()
        assert value == torch.kthvalue(w, k).values.item()


def test_magnitude_half_dtype_ranks_in_float32():
    x = T([0.5, -3.0, 2.0, 1.0]).to(torch.bfloat16)
    out = magnitude(x, 0.5)
    assert out.dtype == torch.bfloat16
    close(out, [0.0, -3.0, 2.0, 0.0])


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize("density", [1.5, 0.0, -0.1, float("nan"), "abc"])
def test_density_out_of_range_is_config_error(density):
    method = get_method("ties")
    with pytest.raises(ConfigError) as info:
        method.validate_value(method.param("density"), density,
                              where="for model './m' on 'model.layers.0.mlp.up_proj.weight'")
    text = str(info.value)
    assert "'density' = " in text and "for model './m'" in text and "\n" not in text
    if density == 1.5:
        assert text == ("ties: parameter 'density' = 1.5 for model './m' on "
                        "'model.layers.0.mlp.up_proj.weight' must be in (0, 1]")


def test_density_error_through_merge():
    with pytest.raises(ConfigError, match=r"'density' = 1\.5 for input 0 on 'w' must be in"):
        merge("ties", [A4], Z4, [{"weight": 1.0, "density": 1.5}], tensor_name="w")


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_weight_required_and_finite(name):
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        merge(name, [A4], Z4, [{}], generator=make_generator(0, "w"))
    with pytest.raises(ConfigError, match="finite"):
        merge(name, [A4], Z4, [{"weight": float("nan")}], generator=make_generator(0, "w"))


def test_lenient_coercion_like_mergekit():
    method = get_method("ties")
    assert method.validate_value(method.param("normalize"), "yes") is True
    assert method.validate_value(method.param("normalize"), 0) is False
    assert method.validate_value(method.param("density"), "1e-3") == pytest.approx(1e-3)
    assert method.validate_value(method.param("weight"), -2) == -2.0
    with pytest.raises(ConfigError, match="boolean"):
        method.validate_value(method.param("normalize"), "maybe")
    with pytest.raises(ConfigError, match="lambda"):
        method.validate_value(method.param("lambda"), float("inf"))
    assert [coerce_rescale(v) for v in (True, False, "l1", "inverse_density", "no")] == [
        "l1", "none", "l1", "inverse_density", "none"]
    with pytest.raises(ConfigError, match="rescale"):
        method.validate_value(method.param("rescale"), "l3")


def test_defaults_match_mergekit():
    def default(method, name):
        return get_method(method).param(name).default

    assert default("linear", "normalize") is True
    assert get_method("linear").param("weight").required
    for name, norm, resc in (("task_arithmetic", False, "none"), ("ties", True, "none"),
                             ("dare_ties", False, "l1"), ("dare_linear", False, "l1"),
                             ("breadcrumbs", False, "none"), ("breadcrumbs_ties", False, "none"),
                             ("della", True, "l1"), ("della_linear", False, "l1")):
        assert default(name, "normalize") is norm, name
        assert default(name, "rescale") == resc, name
        assert default(name, "lambda") == 1.0 and default(name, "density") == 1.0
        assert default(name, "int8_mask") is False
        assert get_method(name).param("weight").required
        assert get_method(name).base == "required"
    assert default("breadcrumbs", "gamma") == 0.01
    assert default("della", "epsilon") == 0.15
    assert get_method("dare_ties").uses_rng and not get_method("ties").uses_rng


# ----------------------------------------------------------------- input handling


def test_shape_mismatch_is_tensor_mismatch_error():
    with pytest.raises(TensorMismatchError, match="'w'"):
        merge("linear", [torch.zeros(2, 3), torch.zeros(3, 3)],
              model_params=[{"weight": 1}, {"weight": 1}], tensor_name="w")


def test_non_float_buffers_are_copied_or_rejected():
    ids = T([1, 2, 3])
    out = merge("ties", [ids.clone()], ids.clone(), [{"weight": 1.0}])
    assert torch.equal(out, ids) and out.dtype == torch.int64
    with pytest.raises(TensorMismatchError, match="differs"):
        merge("ties", [T([1, 2, 4])], ids, [{"weight": 1.0}])


def test_mixed_dtypes_are_promoted():
    out = merge("task_arithmetic", [T([2.0], dtype=torch.float32)],
                T([1.0], dtype=torch.bfloat16), [{"weight": 1.0}])
    assert out.dtype == torch.float32
    close(out, [2.0])
