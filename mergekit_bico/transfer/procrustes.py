"""Orthogonal / semi-orthogonal Procrustes from accumulated cross-covariances.

Given paired rows ``X_A`` (n x d_A) and ``X_B`` (n x d_B), the map ``R`` (d_A x d_B) minimising
``||X_A R - X_B||_F`` over ``R`` with orthonormal columns (d_A >= d_B: ``R^T R = I``) or
orthonormal rows (d_A <= d_B: ``R R^T = I``) is ``R = U V^T`` for the thin SVD
``C = X_A^T X_B = U S V^T``. Only ``C`` is needed, never the rows themselves. For d_A <= d_B this
is the exact minimiser; for d_A > d_B (narrowing) ``||X_A R||`` is no longer constant over the
feasible set and ``U V^T`` is the maximiser of ``tr(R^T C)``, i.e. the exact minimiser of the
mirrored fit ``||X_B R^T - X_A||_F`` (the map is symmetric: fitting B -> A from ``C^T`` gives ``R^T``);
it recovers ``R`` exactly whenever B keeps a subspace of A uncorrelated with the dropped part.

Rank-deficient ``C`` (fewer informative tokens than the width, or a direction no token ever uses,
e.g. the all-ones direction after LayerNorm's centering): singular directions with
``s <= rtol * s_max`` carry no information and an SVD returns them arbitrarily. ``rtol`` defaults to
1e-10, far below the float32 noise floor of ``C`` (~1e-7 relative): a weak but real direction
(attention contexts of a tiny model reach 1e-7) is still fitted, while exact zeros (1e-14 and
below, e.g. LayerNorm's ones direction) are completed. We complete them
deterministically with the map closest to the identity (``I_{d_A x d_B}``): the null parts are
mapped by the Procrustes solution of the identity restricted to the two complements. ``R`` stays
exactly (semi-)orthogonal, the fitted part is unchanged, and where the statistics say nothing the
coordinates are kept.

The residual ``||X_A R - X_B||_F / ||X_B||_F`` follows from second moments:
``||X_A R - X_B||^2 = tr(R^T M_A R) - 2 tr(R^T C) + tr(M_B)`` with ``M = X^T X``; and
``tr(R^T C) = sum(s)`` for ``R = U V^T``. When ``d_A <= d_B`` (``R R^T = I``) the first term is
``tr(M_A)``, so only traces are needed; otherwise the full ``M_A`` is.

Identity prior (``prior > 0``): the fit maximises ``tr(R^T C) + beta tr(R^T I_{d_A x d_B})``, i.e.
trades the data term against closeness to the identity (``||R - I||_F^2 = const - 2 tr(R^T I)`` over
the feasible set), so ``R`` is the polar factor of ``C + beta I`` with ``beta = prior * ||C||_F /
sqrt(min(d_A, d_B))`` (``prior`` in units of the root-mean-square singular value of ``C``).
Directions whose singular values are far above ``beta`` follow the statistics, the weak and unseen
ones stay near the identity: the right prior when both bases share coordinates (a later release of
the same model), where a weak direction's fitted rotation is mostly calibration noise.

``prior="auto"`` picks the prior per matrix from the statistics themselves: ``prior = max(0, rho)
* m^2 / (m^2 + EXACT_MISFIT^2)`` with ``rho = tr(I^T C) / ||C||_*``, the identity's alignment score
as a share of the best one (``tr(R^T C) <= ||C||_*`` for every feasible ``R``, with equality at the
Procrustes map). ``rho`` is near 1 where both sides share coordinates (the identity already
explains the statistics, so whatever it leaves is more likely noise) and near 0 where they do not
(independently trained heads or MLP neurons, whose order carries no meaning), so the prior acts
only where the coordinates are shared. ``m = 1 - ||C||_* / sqrt(tr(M_A) tr(M_B))`` is the best
fit's misfit (0 when ``X_B = c X_A R`` exactly, by Cauchy-Schwarz; needs the traces): a prior
guards against noise, and where the statistics are explained exactly there is none, so it
vanishes. ``EXACT_MISFIT`` (1e-6) sits far above the misfit that rounding leaves in the float32
statistics of an exact reparametrisation (1e-16 to 1e-13 in the known-answer tests) and far below
that of real model pairs (0.05 and above on all-MiniLM-L6-v2 -> paraphrase-MiniLM-L3-v2; at 1e-3
the factor is 1 to within 1e-6), so only exact cases are affected: there ``auto`` is the plain
fit. Without the traces the factor is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["ProcrustesFit", "procrustes", "procrustes_batched", "relative_residual", "polar", "identity_share",
           "best_fit_misfit", "resolve_prior"]

DEFAULT_RTOL = 1e-10
WELL_DETERMINED_RTOL = 1e-6
# Maps at least this wide (both sides) take their polar factor from the symmetric eigenproblem of
# C^T C (or C C^T) in float64 instead of an SVD of C: LAPACK's syevd is about twice as fast as gesdd
# there (1536 x 1536: 1.1 s vs 2.2 s on 2 cores), and exact up to the squaring, which resolves
# singular values down to ~1e-8 s_max only; below EIGH_RTOL a direction counts as unseen (completed
# like any rank-deficient one). Such widths only come from real models, whose float32 statistics
# carry no information at 1e-8 anyway; the small spaces of the known-answer tests keep the SVD.
EIGH_MIN_DIM = 1024
EIGH_RTOL = 1e-7
# ``prior="auto"``: best-fit misfit below which the statistics count as explained exactly (see the
# module docstring)
EXACT_MISFIT = 1e-6
# names the ``auto`` rule in cache keys (maps fitted by an earlier rule are not reused)
AUTO_PRIOR_RULE = "share-times-misfit-factor"


@dataclass
class ProcrustesFit:
    """``r``: (d_A, d_B) map (float64); ``singular_values``: (min(d_A, d_B),) of ``C``;
    ``rank``: number of informative directions (``s > rtol * s_max``); ``trace_rc``: ``tr(R^T C)``."""

    r: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    trace_rc: float  # tr(R^T C) (= sum of singular values up to the completed null part)
    prior: float = 0.0  # the identity prior this fit used (``prior="auto"``: the one it chose)
    misfit: Optional[float] = None  # ``prior="auto"`` with traces: the best fit's misfit (see best_fit_misfit)


def polar(m: torch.Tensor) -> torch.Tensor:
    """Orthogonal (semi-orthogonal) polar factor ``U V^T`` of ``m`` (thin SVD, any rank)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, d - r) of the orthogonal complement of the orthonormal columns of
    ``basis`` (d, r), from one Householder QR (no SVD)."""
    d, r = basis.shape
    if r == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    q, _ = torch.linalg.qr(basis, mode="complete")
    return q[:, r:]


def _complement_from(basis: torch.Tensor, hint: torch.Tensor) -> Optional[torch.Tensor]:
    """Orthonormal basis of the complement of ``basis`` (d, r) spanned by the projections of the
    ``d - r`` columns of ``hint`` (d, d - r), or None when those projections are close to
    dependent. Two thin QRs of a (d, d - r) matrix instead of a complete (d, d) one."""
    d, r = basis.shape
    if hint.shape != (d, d - r):
        return None
    y = hint - basis @ (basis.T @ hint)
    y = y - basis @ (basis.T @ y)           # re-orthogonalise (one pass loses ~eps * cond)
    q, rr = torch.linalg.qr(y)
    if float(rr.diagonal().abs().min()) < 1e-3:
        return None
    q = q - basis @ (basis.T @ q)
    return torch.linalg.qr(q)[0]


def _complete(c: torch.Tensor, u: torch.Tensor, vh: torch.Tensor, rank: int, *,
              u_full: bool = False, v_full: bool = False) -> torch.Tensor:
    """R = U_r V_r^T + N_A W N_B^T with N the orthonormal complements of the informative singular
    vectors and W the polar factor of N_A^T I N_B (closest-to-identity completion; independent of
    which orthonormal bases of the complements are used).

    ``u_full`` / ``v_full``: ``u`` (d_A, d_A) / ``vh`` (d_B, d_B) hold a complete orthonormal basis
    (square SVD, or the eigenvectors of the eigh path): the complement is its tail, no QR. The
    other side's complement comes from projecting the first side's (through ``I``) when those
    projections are independent, from a complete QR otherwise."""
    d_a, d_b = c.shape
    ur, vr = u[:, :rank], vh[:rank, :].T
    r = ur @ vr.T
    if min(d_a, d_b) > rank:
        n_a = u[:, rank:] if u_full and u.shape[1] == d_a else None
        n_b = vh[rank:, :].T if v_full and vh.shape[0] == d_b else None
        if n_a is None and n_b is not None:
            n_a = _complement_from(ur, _identity_rows(n_b, d_a))
        if n_b is None and n_a is not None:
            n_b = _complement_from(vr, _identity_rows(n_a, d_b))
        n_a = _complement(ur) if n_a is None else n_a
        n_b = _complement(vr) if n_b is None else n_b
        w = n_a.T[:, :d_b] @ n_b[:d_a, :]            # N_A^T I_{d_a x d_b} N_B
        if float(w.abs().max()) == 0.0:             # identity prior says nothing either: any completion
            w = torch.eye(*w.shape, dtype=c.dtype, device=c.device)
        r = r + n_a @ polar(w) @ n_b.T
    return r


def _identity_rows(n: torch.Tensor, d: int) -> torch.Tensor:
    """``I_{d x len(n)} n``: the rows of ``n`` cut or zero-padded to ``d``."""
    if n.shape[0] >= d:
        return n[:d]
    return torch.cat([n, n.new_zeros(d - n.shape[0], n.shape[1])])


def _gram(c: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of each matrix of a stack (b, d_A, d_B): ``C C^T`` when d_A < d_B,
    ``C^T C`` otherwise (min(d_A, d_B) square)."""
    return c @ c.transpose(1, 2) if c.shape[1] < c.shape[2] else c.transpose(1, 2) @ c


def _nuclear(c: torch.Tensor, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||C||_*`` of each matrix of a stack (b, d_A, d_B); from the eigenvalues (no vectors) of
    the smaller Gram matrix ``gram`` (computed when not given) where both sides are at least
    ``EIGH_MIN_DIM`` wide, from the singular values otherwise."""
    if min(c.shape[1:]) >= EIGH_MIN_DIM:
        gram = _gram(c) if gram is None else gram
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1)
    return torch.linalg.svdvals(c).sum(-1)


def _shift_gram_(gram: torch.Tensor, c: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Turn ``gram``, the smaller Gram matrices of a stack ``c``, in place into those of
    ``C + beta I_{d_A x d_B}`` without another product: ``G + beta (P + P^T) + beta^2 I`` with ``P``
    the leading min(d_A, d_B) square block of ``C`` (``I C^T`` / ``I^T C`` keep exactly those rows /
    columns)."""
    k = gram.shape[-1]
    for i in range(gram.shape[0]):          # per matrix: a stack-wide transpose is slower
        p, b = c[i, :k, :k], float(beta[i])
        gram[i].add_(p, alpha=b).add_(p.T, alpha=b)
        gram[i].diagonal().add_(b * b)
    return gram


def identity_share(c: torch.Tensor, nuclear: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tr(I^T C) / ||C||_*`` of each matrix of a stack (b, d_A, d_B) (0 where ``C`` is zero):
    the zero-padded identity's alignment score as a share of the Procrustes optimum, in [-1, 1]."""
    d = min(c.shape[1:])
    trace = c[:, :d, :d].diagonal(dim1=1, dim2=2).sum(-1)
    nuclear = _nuclear(c) if nuclear is None else nuclear
    return torch.where(nuclear > 0, trace / nuclear.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(trace))


def best_fit_misfit(c: torch.Tensor, traces: torch.Tensor, nuclear: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 - ||C||_* / sqrt(tr(M_A) tr(M_B))`` of each matrix of a stack, ``traces`` (b, 2) holding
    ``(tr(M_A), tr(M_B))``: in [0, 1], 0 exactly when ``X_B = c X_A R`` for a feasible ``R`` (1
    where a side has no signal)."""
    nuclear = _nuclear(c) if nuclear is None else nuclear
    traces = traces.to(c.dtype).to(c.device)
    norm = (traces[:, 0].clamp_min(0) * traces[:, 1].clamp_min(0)).sqrt()
    share = torch.where(norm > 0, nuclear / norm.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(norm))
    return (1.0 - share).clamp(0.0, 1.0)


def _auto_prior(c: torch.Tensor, traces: Optional[torch.Tensor],
                gram: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``prior="auto"``'s priors and (with ``traces``) the best fits' misfits, one nuclear norm each
    (from ``gram``, the stack's smaller Gram matrices, where given: see :func:`_nuclear`)."""
    nuclear = _nuclear(c, gram)
    share = identity_share(c, nuclear).clamp_min(0.0)
    if traces is None:
        return share, None
    m = best_fit_misfit(c, traces, nuclear)
    return share * m.square() / (m.square() + EXACT_MISFIT ** 2), m


def resolve_prior(c: torch.Tensor, prior: Union[float, str], traces: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The identity prior of each matrix of a stack (b, d_A, d_B): ``prior`` itself, or for
    ``"auto"`` ``max(0, tr(I^T C) / ||C||_*)``, times ``m^2 / (m^2 + EXACT_MISFIT^2)`` for the
    best fit's misfit ``m`` when ``traces`` (b, 2) are given (see the module docstring)."""
    if prior == "auto":
        return _auto_prior(c, traces)[0]
    if isinstance(prior, str):
        raise ValueError(f"identity prior {prior!r} is neither a number >= 0 nor 'auto'")
    return torch.full((c.shape[0],), float(prior), dtype=c.dtype, device=c.device)


def procrustes_batched(c: torch.Tensor, *, rtol: float = DEFAULT_RTOL,
                       prior: Union[float, str] = 0.0, traces: Optional[torch.Tensor] = None) -> list[ProcrustesFit]:
    """Procrustes maps for a stack ``c`` (b, d_A, d_B) of cross-covariances, one batched float64 SVD.

    Returns one :class:`ProcrustesFit` per matrix; rank-deficient matrices get the
    closest-to-identity completion; ``prior > 0`` fits ``C + beta I`` instead (identity prior, see
    the module docstring; ``singular_values`` and ``rank`` are then those of that matrix, while
    ``trace_rc`` stays ``tr(R^T C)`` of the statistics); ``prior="auto"`` chooses it per matrix,
    also from ``traces`` (b, 2) = ``(tr(X_A^T X_A), tr(X_B^T X_B))`` when given (the best fit's misfit).
    """
    if c.dim() == 2:
        c = c.unsqueeze(0)
    c = c.to(torch.float64)
    d_a, d_b = c.shape[1:]
    by_eigh = min(d_a, d_b) >= EIGH_MIN_DIM
    if by_eigh and c.shape[0] > 1:
        # one wide matrix at a time: LAPACK loops over a stack anyway (same time, same maps), and the
        # float64 temporaries are one matrix's, not the stack's (BiCo's peak RSS 1654 -> 1357 MiB on
        # the six 1536-wide maps of benchmarks.bico_cost)
        return [fit for i in range(c.shape[0])
                for fit in procrustes_batched(c[i:i + 1], rtol=rtol, prior=prior,
                                              traces=None if traces is None else traces[i:i + 1])]
    data = c
    gram = _gram(c) if by_eigh else None     # shared by the nuclear norms and the eigenproblem
    priors, misfits = _auto_prior(c, traces, gram) if prior == "auto" else (resolve_prior(c, prior), None)
    if bool((priors > 0).any()):
        beta = priors * torch.linalg.matrix_norm(c) / min(d_a, d_b) ** 0.5
        if gram is not None:
            gram = _shift_gram_(gram, c, beta)
        c = c.clone()
        c.diagonal(dim1=1, dim2=2).add_(beta[:, None])      # C + beta I_{d_A x d_B}
    if by_eigh:
        u, s, vh = _svd_by_eigh(c, gram)
        rtol = max(rtol, EIGH_RTOL)
        u_full, v_full = d_a < d_b, d_a >= d_b     # the eigenvectors' side is complete
    else:
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        u_full, v_full = d_a <= d_b, d_b <= d_a    # thin SVD: the smaller side is complete
    fits: list[ProcrustesFit] = []
    for i in range(c.shape[0]):
        s_i = s[i]
        smax = float(s_i[0]) if s_i.numel() else 0.0
        rank = int((s_i > rtol * smax).sum()) if smax > 0 else 0
        if rank < s_i.numel():
            r_i = _complete(c[i], u[i], vh[i], rank, u_full=u_full, v_full=v_full)
        else:
            r_i = u[i] @ vh[i]
        fits.append(ProcrustesFit(r=r_i, singular_values=s_i, rank=rank, trace_rc=float(torch.dot(r_i.reshape(-1), data[i].reshape(-1))),
                                  prior=float(priors[i]), misfit=None if misfits is None else float(misfits[i])))
    return fits


def _svd_by_eigh(c: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(u, s, vh)`` of a stack (b, d_A, d_B) from the eigendecomposition of its smaller
    Gram matrix ``gram`` (see :func:`_gram`): ``C^T C = V S^2 V^T``,
    ``U = C V / S`` (columns for ``S <= EIGH_RTOL s_max`` are zero: the caller completes those
    directions). Singular values descending."""
    wide = c.shape[1] < c.shape[2]          # d_A < d_B: work with C C^T
    w, q = torch.linalg.eigh(gram)
    w, q = w.flip(-1), q.flip(-1)           # descending
    s = w.clamp_min(0).sqrt()
    smax = s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
    inv = torch.where(s > EIGH_RTOL * smax, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    if wide:                                # q = U; V = C^T U / S
        v = (c.transpose(1, 2) @ q) * inv[:, None, :]
        return q, s, v.transpose(1, 2)
    u = (c @ q) * inv[:, None, :]           # q = V; U = C V / S
    return u, s, q.transpose(1, 2)


def procrustes(c: torch.Tensor, *, rtol: float = DEFAULT_RTOL, prior: Union[float, str] = 0.0,
               traces: Optional[tuple[float, float]] = None) -> ProcrustesFit:
    """Procrustes map ``R`` (d_A x d_B) minimising ``||X_A R - X_B||_F`` from ``C = X_A^T X_B``
    (with ``prior > 0``: plus ``prior`` times the identity term, see the module docstring;
    ``traces``: ``(tr(X_A^T X_A), tr(X_B^T X_B))`` for ``prior="auto"``)."""
    t = None if traces is None else torch.tensor([traces], dtype=torch.float64)
    return procrustes_batched(c, rtol=rtol, prior=prior, traces=t)[0]


def relative_residual(
    r: torch.Tensor,
    trace_rc: float,
    trace_b: float,
    *,
    trace_a: Optional[float] = None,
    m_a: Optional[torch.Tensor] = None,
) -> float:
    """``||X_A R - X_B||_F / ||X_B||_F`` from second moments.

    ``trace_rc = tr(R^T C)``, ``trace_b = tr(X_B^T X_B)``; the ``||X_A R||^2`` term is ``tr(R^T M_A R)``
    from ``m_a`` (needed when d_A > d_B) or ``trace_a = tr(M_A)`` (exact when ``R R^T = I``).
    Returns NaN when ``X_B`` is all zero.
    """
    if m_a is not None:
        m_a = m_a.to(torch.float64)
        r64 = r.to(torch.float64)
        term_a = float(((m_a @ r64) * r64).sum())
    elif trace_a is not None:
        if r.shape[0] > r.shape[1]:
            raise ValueError("residual with d_A > d_B needs the full second moment m_a, not its trace")
        term_a = float(trace_a)
    else:
        raise ValueError("give m_a or trace_a")
    if trace_b <= 0:
        return float("nan")
    sq = term_a - 2.0 * float(trace_rc) + float(trace_b)
    return float(max(sq, 0.0) ** 0.5 / trace_b ** 0.5)
