"""Procrustes maps against closed forms (no scipy): rotations, semi-orthogonal maps, rank
deficiency, and the residual formula from second moments against the direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_bico.transfer.procrustes import polar, procrustes, procrustes_batched, relative_residual


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _semi(d_a: int, d_b: int, gen: torch.Generator) -> torch.Tensor:
    """A (d_a, d_b) matrix with orthonormal rows (d_a <= d_b) or columns (d_a >= d_b)."""
    big = _orthogonal(max(d_a, d_b), gen)
    return big[:d_a, :d_b]


def _direct_residual(xa: torch.Tensor, xb: torch.Tensor, r: torch.Tensor) -> float:
    return float(torch.linalg.norm(xa @ r - xb) / torch.linalg.norm(xb))


def _residual_from_moments(xa: torch.Tensor, xb: torch.Tensor, fit) -> float:
    c = xa.T @ xb
    kwargs = {"m_a": xa.T @ xa} if xa.shape[1] > xb.shape[1] else {"trace_a": float((xa * xa).sum())}
    assert math.isclose(fit.trace_rc, float((fit.r * c).sum()), rel_tol=1e-10)
    return relative_residual(fit.r, fit.trace_rc, float((xb * xb).sum()), **kwargs)


def test_known_rotation_is_recovered():
    gen = torch.Generator().manual_seed(0)
    q = _orthogonal(8, gen)
    xa = torch.randn(200, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    fit = procrustes(xa.T @ (xa @ q))
    assert fit.rank == 8
    torch.testing.assert_close(fit.r, q, rtol=0, atol=1e-10)
    assert _direct_residual(xa, xa @ q, fit.r) < 1e-12


def test_two_by_two_closed_form():
    """In 2-D the optimum over O(2) is a rotation by atan2(c-b, a+d) or a reflection, whichever
    gives the larger tr(R^T C): sqrt((a+d)^2+(c-b)^2) vs sqrt((a-d)^2+(b+c)^2)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        c = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        a, b, cc, d = c[0, 0].item(), c[0, 1].item(), c[1, 0].item(), c[1, 1].item()
        rot_val = math.hypot(a + d, cc - b)
        ref_val = math.hypot(a - d, b + cc)
        if rot_val >= ref_val:
            t = math.atan2(cc - b, a + d)
            expected = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
        else:
            t = math.atan2(b + cc, a - d)
            expected = torch.tensor([[math.cos(t), math.sin(t)], [math.sin(t), -math.cos(t)]], dtype=torch.float64)
        fit = procrustes(c)
        torch.testing.assert_close(fit.r, expected, rtol=0, atol=1e-10)
        assert math.isclose(fit.trace_rc, max(rot_val, ref_val), rel_tol=1e-10)


def test_semi_orthogonal_widening_is_recovered():
    """d_A < d_B: X_B = X_A P with orthonormal rows P; R R^T = I and R = P exactly."""
    gen = torch.Generator().manual_seed(2)
    p = _semi(6, 10, gen)
    xa = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    xb = xa @ p
    fit = procrustes(xa.T @ xb)
    assert fit.r.shape == (6, 10)
    torch.testing.assert_close(fit.r, p, rtol=0, atol=1e-10)
    torch.testing.assert_close(fit.r @ fit.r.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert _residual_from_moments(xa, xb, fit) < 1e-6


def test_semi_orthogonal_narrowing_is_recovered():
    """d_A > d_B: B keeps a d_B-dim subspace range(P) of A's coordinates and A's other directions
    are uncorrelated with it; R = U V^T (maximising tr(R^T C)) equals P and R^T R = I."""
    gen = torch.Generator().manual_seed(2)
    d_a, d_b, n = 10, 6, 300
    full = _orthogonal(d_a, gen)
    p = full[:, :d_b]
    zw, _ = torch.linalg.qr(torch.randn(n, d_a, generator=gen, dtype=torch.float64))
    zw = zw * torch.linspace(1, 5, d_a, dtype=torch.float64)  # orthogonal columns: Z^T W = 0
    xa = zw @ full.T          # X_A P = Z, X_A P_perp = W
    xb = xa @ p
    fit = procrustes(xa.T @ xb)
    torch.testing.assert_close(fit.r, p, rtol=0, atol=1e-10)
    torch.testing.assert_close(fit.r.T @ fit.r, torch.eye(d_b, dtype=torch.float64), rtol=0, atol=1e-12)
    assert _residual_from_moments(xa, xb, fit) < 1e-6


def test_map_is_symmetric_in_the_two_models():
    """Fitting B -> A from C^T gives the transpose: R_BA = R_AB^T (any widths)."""
    gen = torch.Generator().manual_seed(8)
    for d_a, d_b in [(5, 5), (4, 7), (7, 4)]:
        c = torch.randn(d_a, d_b, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(procrustes(c.T).r, procrustes(c).r.T, rtol=0, atol=1e-12)


def test_zero_padded_widening_is_an_embedding():
    """B = A's coordinates plus zero columns: R = [I, 0] (the padding receives nothing)."""
    gen = torch.Generator().manual_seed(3)
    xa = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    xb = torch.cat([xa, torch.zeros(100, 3, dtype=torch.float64)], dim=1)
    fit = procrustes(xa.T @ xb)
    torch.testing.assert_close(fit.r, torch.eye(5, 8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rank_deficient_fits_the_range_and_keeps_null_coordinates():
    """X_A uses only r < d directions: R is still orthogonal, maps the used range exactly, and the
    unused coordinates (no information) are completed by the closest-to-identity map."""
    gen = torch.Generator().manual_seed(4)
    d, r = 7, 4
    q_r = _orthogonal(r, gen)
    z = torch.randn(50, r, generator=gen, dtype=torch.float64)
    xa = torch.cat([z, torch.zeros(50, d - r, dtype=torch.float64)], dim=1)
    xb = torch.cat([z @ q_r, torch.zeros(50, d - r, dtype=torch.float64)], dim=1)
    fit = procrustes(xa.T @ xb)
    assert fit.rank == r
    torch.testing.assert_close(fit.r.T @ fit.r, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(xa @ fit.r, xb, rtol=0, atol=1e-10)
    expected = torch.eye(d, dtype=torch.float64)
    expected[:r, :r] = q_r
    torch.testing.assert_close(fit.r, expected, rtol=0, atol=1e-10)


def test_rank_deficient_in_a_rotated_subspace():
    """Low-rank data in a generic subspace (fewer tokens than dims): the fitted part is exact and
    the map stays orthogonal; the residual is zero."""
    gen = torch.Generator().manual_seed(5)
    d = 9
    q = _orthogonal(d, gen)
    xa = torch.randn(5, d, generator=gen, dtype=torch.float64)  # 5 tokens < 9 dims
    fit = procrustes(xa.T @ (xa @ q))
    assert fit.rank == 5
    torch.testing.assert_close(fit.r @ fit.r.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(xa @ fit.r, xa @ q, rtol=0, atol=1e-10)
    assert _residual_from_moments(xa, xa @ q, fit) < 1e-6


def test_all_zero_statistics_give_identity():
    fit = procrustes(torch.zeros(4, 6, dtype=torch.float64))
    assert fit.rank == 0
    torch.testing.assert_close(fit.r, torch.eye(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("d_a,d_b", [(5, 5), (4, 7), (7, 4)])
def test_residual_formula_matches_direct(d_a, d_b):
    gen = torch.Generator().manual_seed(6)
    xa = torch.randn(40, d_a, generator=gen, dtype=torch.float64)
    xb = torch.randn(40, d_b, generator=gen, dtype=torch.float64) + xa @ torch.randn(d_a, d_b, generator=gen, dtype=torch.float64)
    fit = procrustes(xa.T @ xb)
    direct = _direct_residual(xa, xb, fit.r)
    assert math.isclose(_residual_from_moments(xa, xb, fit), direct, rel_tol=1e-9)
    # optimality: random (semi-)orthogonal maps never do better
    for _ in range(10):
        other = _semi(d_a, d_b, gen)
        assert _direct_residual(xa, xb, other) >= direct - 1e-12


def test_batched_equals_single_and_polar():
    gen = torch.Generator().manual_seed(7)
    cs = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    fits = procrustes_batched(cs)
    for c, fit in zip(cs, fits):
        torch.testing.assert_close(fit.r, procrustes(c).r)
        torch.testing.assert_close(fit.r, polar(c))


def test_residual_needs_full_moment_when_narrowing():
    with pytest.raises(ValueError):
        relative_residual(torch.zeros(5, 3, dtype=torch.float64), 0.0, 1.0, trace_a=1.0)


@pytest.mark.parametrize("shape", [(40, 40), (50, 36), (36, 50)])
@pytest.mark.parametrize("rank", [None, 20])
@pytest.mark.parametrize("prior", [0.0, 0.7, "auto"])
def test_eigh_path_equals_the_svd_path(monkeypatch, shape, rank, prior):
    """Wide maps use the eigendecomposition of the Gram matrix (faster); same map, same rank, same
    completion of unseen directions as the SVD path (thresholds lowered to run it on small maps).
    With an identity prior the eigenproblem is that of ``C + beta I``, its Gram matrix updated from
    the one the nuclear norm used: the same map as the SVD of ``C + beta I``."""
    from mergekit_bico.transfer import procrustes as pr

    gen = torch.Generator().manual_seed(3)
    x_a = torch.randn(300, shape[0], generator=gen, dtype=torch.float64)
    k = min(shape)
    mix = torch.eye(k, shape[1], dtype=torch.float64) + torch.randn(k, shape[1], generator=gen, dtype=torch.float64) / k ** 0.5
    if rank is not None:
        x_a = x_a @ torch.linalg.qr(torch.randn(shape[0], rank, generator=gen, dtype=torch.float64))[0] \
            @ torch.randn(rank, shape[0], generator=gen, dtype=torch.float64)
    x_b = x_a[:, :k] @ mix + 0.3 * torch.randn(300, shape[1], generator=gen, dtype=torch.float64)
    c = x_a.T @ x_b
    traces = (float((x_a * x_a).sum()), float((x_b * x_b).sum()))
    ref = pr.procrustes(c, rtol=1e-7, prior=prior, traces=traces)
    monkeypatch.setattr(pr, "EIGH_MIN_DIM", 1)
    got = pr.procrustes(c, rtol=1e-7, prior=prior, traces=traces)
    # the nuclear norm from the Gram's eigenvalues: unseen directions add sqrt(noise) ~ 1e-8 s_max each
    assert math.isclose(got.prior, ref.prior, rel_tol=1e-6)
    if prior == "auto":
        assert 0.05 < got.prior < 1 and 0 < got.misfit < 1 and math.isclose(got.misfit, ref.misfit, rel_tol=1e-6)
    if prior:                                   # C + beta I: full rank whatever C's rank
        rank = None
    assert got.rank == ref.rank == (rank or min(shape))
    smax, r = float(ref.singular_values[0]), got.rank
    tol = 1e-7 if prior == "auto" else 1e-9     # auto: beta inherits the nuclear norm's 1e-8 (above)
    torch.testing.assert_close(got.singular_values[:r], ref.singular_values[:r], rtol=tol, atol=tol * smax)
    assert (float(got.singular_values[r:].max()) if r < len(got.singular_values) else 0.0) < 1e-7 * smax   # the squaring's noise floor
    torch.testing.assert_close(got.r, ref.r, rtol=0, atol=1e-7)
    eye = torch.eye(k, dtype=torch.float64)
    gram = got.r.T @ got.r if shape[0] >= shape[1] else got.r @ got.r.T
    torch.testing.assert_close(gram, eye, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prior", [0.0, "auto"])
def test_eigh_path_fits_a_stack_one_matrix_at_a_time(monkeypatch, prior):
    """A stack of wide matrices is fitted one matrix at a time (each with its own traces and
    prior): the same fits as fitting each matrix alone, in the stack's order."""
    from mergekit_bico.transfer import procrustes as pr

    monkeypatch.setattr(pr, "EIGH_MIN_DIM", 1)
    gen = torch.Generator().manual_seed(5)
    cs, traces = [], []
    for scale, noise in [(1.0, 0.2), (3.0, 1.0), (0.5, 0.05)]:
        x_a = torch.randn(200, 30, generator=gen, dtype=torch.float64)
        near_identity = pr.polar(torch.eye(30, dtype=torch.float64) + 0.3 * torch.randn(30, 30, generator=gen, dtype=torch.float64))
        x_b = scale * x_a @ near_identity + noise * torch.randn(200, 30, generator=gen, dtype=torch.float64)
        cs.append(x_a.T @ x_b)
        traces.append([float((x_a * x_a).sum()), float((x_b * x_b).sum())])
    stack, traces = torch.stack(cs), torch.tensor(traces, dtype=torch.float64)
    fits = pr.procrustes_batched(stack, rtol=1e-7, prior=prior, traces=traces)
    assert len(fits) == 3
    priors = set()
    for c, t, fit in zip(cs, traces, fits):
        alone = pr.procrustes(c, rtol=1e-7, prior=prior, traces=tuple(t.tolist()))
        torch.testing.assert_close(fit.r, alone.r, rtol=0, atol=1e-12)
        assert fit.rank == alone.rank and fit.prior == alone.prior and fit.misfit == alone.misfit
        assert math.isclose(fit.trace_rc, float((alone.r * c).sum()), rel_tol=1e-12)
        priors.add(fit.prior)
    assert len(priors) == (3 if prior == "auto" else 1)     # each matrix got its own prior


@pytest.mark.parametrize("eigh", [False, True])
@pytest.mark.parametrize("shape", [(40, 40), (50, 36), (36, 50)])
@pytest.mark.parametrize("rank", [39, 33, 20, 1])
def test_fast_completion_equals_complete_qr(monkeypatch, eigh, shape, rank):
    """The unseen directions' bases come from the SVD / eigh tails or from projecting the other
    side's tail (thin QRs) instead of two complete QRs: the same map, exactly (semi-)orthogonal."""
    from mergekit_bico.transfer import procrustes as pr

    rank = min(rank, min(shape) - 1)
    gen = torch.Generator().manual_seed(rank)
    c = torch.randn(shape[0], rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(c, full_matrices=False)
    ref = pr._complete(c, u, vh, rank)                  # complements from complete QRs
    if eigh:
        monkeypatch.setattr(pr, "EIGH_MIN_DIM", 1)
    complete_qrs = []
    real = pr._complement
    monkeypatch.setattr(pr, "_complement", lambda b: complete_qrs.append(b.shape) or real(b))
    got = pr.procrustes(c, rtol=1e-7)
    assert got.rank == rank
    if shape[0] == shape[1]:
        assert complete_qrs == []                       # square: both sides without a complete QR
    else:
        assert len(complete_qrs) <= 1                   # the larger side when widths differ
    torch.testing.assert_close(got.r, ref, rtol=0, atol=1e-9)
    gram = got.r.T @ got.r if shape[0] >= shape[1] else got.r @ got.r.T
    torch.testing.assert_close(gram, torch.eye(min(shape), dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("prior,theta", [(1.0, math.pi / 2), (0.5, math.pi / 3), (3.0, 2.0)])
def test_identity_prior_two_by_two_closed_form(prior, theta):
    """C = s Rot(theta): ||C||_F / sqrt(2) = s, so beta = prior * s and C + beta I is a scaled rotation
    by atan2(sin theta, cos theta + prior); e.g. theta = 90 degrees, prior 1: 45 degrees."""
    s = 2.5
    rot = lambda t: torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    c = s * rot(theta)
    fit = procrustes(c, prior=prior)
    expected = rot(math.atan2(math.sin(theta), math.cos(theta) + prior))
    torch.testing.assert_close(fit.r, expected, rtol=0, atol=1e-12)
    assert math.isclose(fit.trace_rc, float((expected * c).sum()), rel_tol=1e-12)   # of C, not C + beta I


@pytest.mark.parametrize("shape", [(12, 12), (8, 12), (12, 8)])
def test_identity_prior_limits_and_feasibility(shape):
    """prior 0 is the plain fit; a huge prior gives the (zero-padded) identity; any prior keeps R
    (semi-)orthogonal; a rank-deficient C gets its weak directions from the prior, not completed."""
    gen = torch.Generator().manual_seed(7)
    c = torch.randn(*shape, generator=gen, dtype=torch.float64)
    plain = procrustes(c)
    torch.testing.assert_close(procrustes(c, prior=0.0).r, plain.r, rtol=0, atol=0)
    eye = torch.eye(*shape, dtype=torch.float64)
    assert float((procrustes(c, prior=1e6).r - eye).abs().max()) < 1e-5
    mid = procrustes(c, prior=1.0).r
    gram = mid.T @ mid if shape[0] >= shape[1] else mid @ mid.T
    torch.testing.assert_close(gram, torch.eye(min(shape), dtype=torch.float64), rtol=0, atol=1e-10)
    assert float((mid - plain.r).abs().max()) > 1e-2 and float((mid - eye).abs().max()) > 1e-2
    low = c[:, :1] @ c[:1, :]                                    # rank 1
    fit = procrustes(low, prior=1e-3)
    assert fit.rank == min(shape)                                # C + beta I has full rank
    gram = fit.r.T @ fit.r if shape[0] >= shape[1] else fit.r @ fit.r.T
    torch.testing.assert_close(gram, torch.eye(min(shape), dtype=torch.float64), rtol=0, atol=1e-10)


def test_identity_share_hand_values():
    """rho = tr(I^T C) / ||C||_*: 1 for a positive diagonal, 0 for a swap or a reflection that
    cancels, -1 for -I, cos(theta) for a scaled rotation, 2/3 for a wide C whose rows have norms 2
    and 1 and trace 2, 0 for an all-zero C."""
    from mergekit_bico.transfer.procrustes import identity_share

    theta = 0.7
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    square = torch.stack([torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)),
                          torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64),
                          torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)),
                          -torch.eye(2, dtype=torch.float64), 2.5 * rot, torch.zeros(2, 2, dtype=torch.float64)])
    got = identity_share(square)
    expected = torch.tensor([1.0, 0.0, 0.0, -1.0, math.cos(theta), 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    wide = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(identity_share(wide), torch.tensor([2 / 3], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(identity_share(wide.transpose(1, 2)), torch.tensor([2 / 3], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 1040), (1040, 1024)])
def test_identity_share_of_wide_spaces_uses_the_nuclear_norm_of_the_construction(shape):
    """At >= 1024 the nuclear norm comes from the smaller Gram's eigenvalues: against C = U S V^T
    built with known singular values (sum of S) and its trace read off directly."""
    from mergekit_bico.transfer.procrustes import identity_share

    gen = torch.Generator().manual_seed(3)
    d = min(shape)
    s = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1
    u, v = _semi(shape[0], d, gen), _semi(shape[1], d, gen)
    c = (u * s) @ v.T
    expected = float(torch.diagonal(c[:d, :d]).sum()) / float(s.sum())
    got = float(identity_share(c.unsqueeze(0))[0])
    assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)


def test_auto_prior_is_the_identity_share_per_matrix():
    """prior="auto" on a stack: C1 = s Rot(theta) gets prior cos(theta), so R rotates by
    atan2(sin theta, 2 cos theta); C2 = -Rot(0.3) (rho < 0) gets prior 0: the plain fit; each fit
    records the prior it used. A numeric prior is used as given; any other string is refused."""
    from mergekit_bico.transfer.procrustes import resolve_prior

    rot = lambda t: torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    theta = 1.1
    stack = torch.stack([2.5 * rot(theta), -rot(0.3)])
    first, second = procrustes_batched(stack, prior="auto")
    assert math.isclose(first.prior, math.cos(theta), rel_tol=1e-12) and second.prior == 0.0
    torch.testing.assert_close(first.r, rot(math.atan2(math.sin(theta), 2 * math.cos(theta))), rtol=0, atol=1e-12)
    torch.testing.assert_close(second.r, -rot(0.3), rtol=0, atol=1e-12)
    torch.testing.assert_close(resolve_prior(stack, 0.5), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert procrustes(stack[0], prior=0.5).prior == 0.5
    with pytest.raises(ValueError, match="'sometimes' is neither a number >= 0 nor 'auto'"):
        resolve_prior(stack, "sometimes")


def test_best_fit_misfit_hand_values():
    """m = 1 - ||C||_* / sqrt(tr M_A tr M_B): 0 when the traces are what an exact (scaled) fit
    gives, 1 - 4/5 for C = diag(3, 1) with traces 5 and 5, 1 - 3/6 for a wide C of nuclear norm 3
    with traces 9 and 4, 1 where a side has no signal."""
    from mergekit_bico.transfer.procrustes import best_fit_misfit

    diag = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    stack = torch.stack([diag, diag, diag])
    traces = torch.tensor([[4.0, 4.0], [5.0, 5.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(best_fit_misfit(stack, traces), torch.tensor([0.0, 0.2, 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    wide = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(best_fit_misfit(wide, torch.tensor([[9.0, 4.0]], dtype=torch.float64)),
                               torch.tensor([0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_auto_prior_vanishes_where_the_statistics_are_explained_exactly():
    """X_B = 2 X_A Q exactly (Q a rotation with a positive trace, so the identity's share is
    positive): with the traces, auto's prior is 0 (to rounding) and R = Q; without them the
    share alone moves R off Q. With a misfit of 0.2 the factor is 1 to within 1e-10."""
    from mergekit_bico.transfer.procrustes import identity_share

    gen = torch.Generator().manual_seed(5)
    x_a = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    q = torch.linalg.matrix_exp(0.3 * (lambda a: a - a.T)(torch.randn(6, 6, generator=gen, dtype=torch.float64)))
    x_b = 2.0 * x_a @ q
    c = x_a.T @ x_b
    traces = (float((x_a * x_a).sum()), float((x_b * x_b).sum()))
    share = float(identity_share(c.unsqueeze(0))[0])
    assert share > 0.5
    exact = procrustes(c, prior="auto", traces=traces)
    assert exact.prior < 1e-12 and exact.misfit < 1e-12
    torch.testing.assert_close(exact.r, q, rtol=0, atol=1e-10)
    share_only = procrustes(c, prior="auto")
    assert math.isclose(share_only.prior, share, rel_tol=1e-12) and share_only.misfit is None
    assert float((share_only.r - q).abs().max()) > 1e-3
    nuclear = float(torch.linalg.svdvals(c).sum())
    noisy = procrustes(c, prior="auto", traces=(nuclear / 0.8, nuclear / 0.8))   # misfit 0.2
    assert math.isclose(noisy.misfit, 0.2, rel_tol=1e-9)
    assert math.isclose(noisy.prior, share, rel_tol=1e-10)
