"""Parity of mergekit-bico's merge methods with mergekit 0.1.5, in process.

Run with a Python that has mergekit 0.1.5 installed and our package on the path::

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0
    /tmp/mkvenv/bin/pip install mergekit==0.1.5   # or the 0.1.5 wheel
    PYTHONPATH=/work/main /tmp/mkvenv/bin/python benchmarks/parity_methods.py

Each case calls mergekit's own method object (``mergekit.merge_methods.
merge_tensors``) and our ``MergeMethod.merge`` on the same random tensors and
prints the max abs difference. Deterministic methods must agree to 1e-6
(float32/float64) or to 1 ulp-ish of the half dtype (half inputs are computed
in the half dtype by both). Random methods (DARE, DELLA) are compared twice:
with torch.bernoulli inside mergekit replaced by the same uniform draws our
generator makes (exact), and in distribution (kept fraction, L1 rescale).
Exits 1 on any mismatch. ``--speed`` instead times TIES top-k pruning of a
4096x4096 tensor (mergekit's argsort vs our radix select).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import mergekit.sparsify as mk_sparsify
import torch
from mergekit.merge_methods import merge_tensors

from mergekit_bico.methods import get_method

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 0.0, torch.float16: 0.0}
rows: list[tuple[str, str, float, float, bool]] = []


def ours(method: str, tensors, base, model_params, global_params, generator=None):
    return get_method(method).merge(
        tensors, base, model_params, global_params, tensor_name="t", generator=generator
    )


def theirs(method: str, tensors, base, per_model: dict[str, list], shared: dict[str, Any]):
    params = dict(shared)
    params.update(per_model)
    if base is None:
        return merge_tensors(list(tensors), method, parameters=params)
    return merge_tensors([base, *tensors], method, parameters=params, base_index=0)


def record(method: str, label: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    diff = (a.double() - b.double()).abs()
    nan_mismatch = bool((a.isnan() != b.isnan()).any())
    value = float(torch.nan_to_num(diff, nan=0.0).max()) if diff.numel() else 0.0
    ok = value <= tol and not nan_mismatch
    rows.append((method, label, value, tol, ok))


def split(per_model: dict[str, list], n: int) -> list[dict[str, Any]]:
    return [{k: v[i] for k, v in per_model.items()} for i in range(n)]


def rand_models(n: int, shape, dtype, seed: int, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def distinct_half_models(n: int, shape, dtype, seed: int):
    """Base 0 and models whose |values| are distinct within each model, so that
    magnitude ranking has no ties (half dtypes have very few distinct values)."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    models = []
    for _ in range(n):
        exps = torch.rand(numel * 8, generator=g) * -14.0  # 14 octaves of magnitudes
        pool = torch.unique(torch.exp2(exps).to(dtype).float())
        pool = pool[pool > 0]
        pick = pool[torch.randperm(pool.numel(), generator=g)[:numel]]
        signs = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
        models.append((pick * signs).reshape(shape).to(dtype))
    return torch.zeros(shape, dtype=dtype), models


def case(method, label, base, tensors, per_model, shared, *, include_base=True, tol=None):
    tol = TOL[(tensors[0] if tensors else base).dtype] if tol is None else tol
    given_base = base if include_base else None
    a = ours(method, tensors, given_base, split(per_model, len(tensors)), shared)
    b = theirs(method, tensors, given_base, per_model, shared)
    record(method, label, a, b, tol)


def deterministic_cases() -> None:
    shape = (96, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        dn = str(dtype).replace("torch.", "")
        base, ms = rand_models(3, shape, dtype, seed=1)
        # linear: weights incl. negative, normalize on/off, 1-D, scalar
        for w, norm in (([1.0, 2.0, 0.5], True), ([0.3, 0.7, -0.2], True),
                        ([0.3, 0.7, -0.2], False), ([1.0, -1.5, 2.25], False)):
            case("linear", f"{dn} w={w} normalize={norm}", None, ms,
                 {"weight": w}, {"normalize": norm}, include_base=False)
        case("linear", f"{dn} 1-D", None, [m[0] for m in ms], {"weight": [0.2, 0.5, 0.3]}, {},
             include_base=False)
        case("linear", f"{dn} 0-D", None, [m[0, 0] for m in ms], {"weight": [0.2, 0.5, 0.3]},
             {}, include_base=False)
        # task arithmetic
        for w, norm, lam in (([1.0, 0.5, 0.25], False, 1.0), ([0.7, -0.4, 0.2], True, 1.0),
                             ([0.5, 0.5, 0.5], False, 0.6), ([1.0, -1.0, 0.0], True, 1.3),
                             ([1e-9, 0.0, -1e-9], True, 1.0)):
            case("task_arithmetic", f"{dn} w={w} norm={norm} lambda={lam}", base, ms,
                 {"weight": w}, {"normalize": norm, "lambda": lam})
        case("task_arithmetic", f"{dn} defaults", base, ms, {"weight": [0.3, 0.3, 0.4]}, {})
        case("passthrough", f"{dn} no scale", None, ms[:1], {}, {}, include_base=False)
        case("passthrough", f"{dn} scale=0.37", None, ms[:1], {"scale": [0.37]}, {},
             include_base=False)

    # ranking methods: float32/float64 with random base, half dtypes with distinct magnitudes
    sources = []
    for dtype in (torch.float32, torch.float64):
        sources.append((str(dtype)[6:], *rand_models(3, (96, 64), dtype, seed=2)))
    for dtype in (torch.bfloat16, torch.float16):
        sources.append((str(dtype)[6:] + " distinct", *distinct_half_models(3, (32, 24), dtype, 3)))
    for dn, base, ms in sources:
        for dens, w, norm, lam, int8, resc in (
            ([0.3, 0.5, 0.7], [1.0, 1.0, 1.0], None, None, None, None),
            ([0.2, 0.2, 0.2], [0.5, -0.3, 0.8], True, 1.0, True, False),
            ([0.9, 0.1, 0.5], [0.5, 0.3, 0.8], False, 0.7, False, True),
            ([1.0, 0.5, 1e-4], [1.0, -1.0, 2.0], True, 1.0, False, False),
            ([0.25, 0.25, 0.25], [1.0, -1.0, 0.5], True, 2.0, False, True),
        ):
            shared = {k: v for k, v in (("normalize", norm), ("lambda", lam),
                                        ("int8_mask", int8), ("rescale", resc)) if v is not None}
            label = f"{dn} d={dens} w={w} {shared}"
            case("ties", label, base, ms, {"weight": w, "density": dens}, shared)
            for gamma in (0.01, 0.1):
                case("breadcrumbs", f"{label} gamma={gamma}", base, ms,
                     {"weight": w, "density": dens, "gamma": [gamma] * 3}, shared)
                case("breadcrumbs_ties", f"{label} gamma={gamma}", base, ms,
                     {"weight": w, "density": dens, "gamma": [gamma] * 3}, shared)
        case("ties", f"{dn} density default", base, ms, {"weight": [1, 1, 1]}, {})
        case("breadcrumbs", f"{dn} gamma default", base, ms,
             {"weight": [1, 1, 1], "density": [0.5] * 3}, {})
    # one input, base listed only
    base, ms = rand_models(1, (8, 8), torch.float32, seed=4)
    case("ties", "no non-base input returns base", base, [], {}, {})


class SubstitutedBernoulli:
    """Replaces torch.bernoulli inside mergekit with ``U < p`` where U comes
    from a generator seeded like ours; the draws happen in the same order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.original = mk_sparsify.torch.bernoulli

    def __call__(self, p, *args, **kwargs):
        draws = torch.rand(p.shape, generator=self.generator, dtype=torch.float32)
        return (draws < p).to(p.dtype)

    def __enter__(self):
        mk_sparsify.torch.bernoulli = self
        return self

    def __exit__(self, *exc):
        mk_sparsify.torch.bernoulli = self.original


def random_cases() -> None:
    sources = [("float32", *rand_models(3, (64, 48), torch.float32, seed=5))]
    for dtype in (torch.bfloat16, torch.float16):  # no magnitude ties (DELLA ranks rows)
        sources.append((str(dtype)[6:] + " distinct", *distinct_half_models(3, (24, 20), dtype, 7)))
    for dn, base, ms in sources:
        tol = TOL[ms[0].dtype]
        for method, extra in (("dare_linear", {}), ("dare_ties", {}),
                              ("della", {"epsilon": [0.1, 0.05, 0.2]}),
                              ("della_linear", {"epsilon": [0.1, 0.05, 0.2]})):
            for resc, norm in ((None, None), (False, True), (True, False)):
                shared = {k: v for k, v in (("rescale", resc), ("normalize", norm))
                          if v is not None}
                per_model = {"weight": [0.6, -0.3, 0.9], "density": [0.3, 0.5, 0.7], **extra}
                a = ours(method, ms, base, split(per_model, len(ms)), shared,
                         generator=torch.Generator().manual_seed(11))
                with SubstitutedBernoulli(11):
                    b = theirs(method, ms, base, per_model, shared)
                record(method, f"{dn} same draws {shared}", a, b, tol)
                if method.startswith("dare"):
                    # mergekit's real torch.bernoulli on CPU under torch.manual_seed(s)
                    # consumes the RNG exactly like rand(...) < p: identical masks.
                    torch.manual_seed(11)
                    b = theirs(method, ms, base, per_model, shared)
                    record(method, f"{dn} real bernoulli, same seed {shared}", a, b, tol)

    # in distribution, mergekit's real torch.bernoulli vs our generator
    base, (m,) = rand_models(1, (512, 512), torch.float32, seed=6)
    delta = m - base
    for density in (0.1, 0.5, 0.9):
        torch.manual_seed(123)
        b = theirs("dare_linear", [m], base, {"weight": [1.0], "density": [density]}, {})
        a = ours("dare_linear", [m], base, [{"weight": 1.0, "density": density}], {},
                 generator=torch.Generator().manual_seed(123))
        kept_a = float(((a - base) != 0).float().mean())
        kept_b = float(((b - base) != 0).float().mean())
        rows.append(("dare_linear", f"kept fraction d={density}: ours {kept_a:.4f} "
                     f"mergekit {kept_b:.4f}", abs(kept_a - kept_b), 0.01,
                     abs(kept_a - kept_b) <= 0.01))
        l1 = float(delta.abs().sum())
        la, lb = float((a - base).abs().sum()) / l1, float((b - base).abs().sum()) / l1
        rows.append(("dare_linear", f"L1 ratio d={density}: ours {la:.6f} mergekit {lb:.6f}",
                     abs(la - lb), 1e-4, abs(la - lb) <= 1e-4))
        a = ours("dare_linear", [m], base, [{"weight": 1.0, "density": density}],
                 {"rescale": "inverse_density"}, generator=torch.Generator().manual_seed(1))
        kept = (a - base) != 0
        ratio = float(((a - base)[kept] / delta[kept]).mean())
        rows.append(("dare_linear", f"inverse_density kept/orig d={density}: {ratio:.5f}",
                     abs(ratio - 1 / density), 1e-3, abs(ratio - 1 / density) <= 1e-3))


def speed(repeats: int = 5) -> None:
    """TIES top-k on a 4096x4096 delta: mergekit's argsort vs our radix select.

    Runs are interleaved and the best of ``repeats`` is kept (shared machines)."""
    import time

    from mergekit_bico.methods.sparsify import magnitude as our_magnitude

    def clock(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"\ntop-k magnitude pruning, 4096x4096, 1 torch thread, best of {repeats}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, 4096, generator=g).to(dtype)
        for density in (0.1, 0.5, 0.9):
            t_mk = t_us = math.inf
            for _ in range(repeats):
                elapsed, a = clock(lambda x=x, d=density: mk_sparsify.magnitude(x, d))
                t_mk = min(t_mk, elapsed)
                elapsed, b = clock(lambda x=x, d=density: our_magnitude(x, d))
                t_us = min(t_us, elapsed)
            differ = (a != 0) != (b != 0)
            # any difference must be a choice among elements tied at the threshold
            kept_min = x.abs().float()[b != 0].min()
            ties_only = bool((x.abs().float()[differ] == kept_min).all())
            print(f"  {str(dtype)[6:]:8} density {density}: mergekit argsort {t_mk:.3f}s  "
                  f"ours {t_us:.3f}s  ratio {t_mk / t_us:.1f}x  kept-set differences "
                  f"{int(differ.sum())} (all tied at the threshold: {ties_only})")


def main() -> int:
    if "--speed" in sys.argv:
        speed()
        return 0
    torch.set_num_threads(1)
    deterministic_cases()
    random_cases()
    width = max(len(f"{method}  {label}") for method, label, *_ in rows)
    print(f"{'method  case':<{width}}  {'max|diff|':>10}  {'tol':>7}  ok")
    for method, label, value, tol, ok in rows:
        verdict = "ok" if ok else "FAIL"
        print(f"{method + '  ' + label:<{width}}  {value:10.3e}  {tol:7.0e}  {verdict}")
    failed = [r for r in rows if not r[4]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases match mergekit 0.1.5")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
