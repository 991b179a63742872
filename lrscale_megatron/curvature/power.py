"""Power iteration (and PyHessian-style deflated power iteration, a comparison baseline).

The residual ``||A v - lambda v||`` is computed from the fresh product of every iteration, so it is the
true residual. A converged result is also probed for symmetry with one more product
(:func:`~lrscale_megatron.curvature.krylov.check_ritz_pairs` explains why): power iteration on a
non-symmetric operator can converge to one of its genuine right eigenvectors, which is not a Hessian
eigenvalue.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from lrscale_megatron.curvature import krylov as kr
from lrscale_megatron.curvature.results import EigenResult, LinearOperator
from lrscale_megatron.curvature.vectors import Vector

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- power
def _power(
    op: LinearOperator,
    v: Vector,
    max_iter: int,
    tol: float,
    deflate: Sequence[Vector],
    history: list[float],
) -> tuple[float, float, Vector, int, bool, str | None]:
    """Power iteration on ``P A P`` (``P`` projects out ``deflate``) from the unit vector ``v``.

    Returns ``(eigenvalue, residual, vector, n_matvec, converged, failure)``; the residual is
    ``||P A v - lambda v||`` for the Rayleigh quotient ``lambda = v^T A v``.
    """
    be = op.backend
    lam, res = math.nan, math.nan
    for it in range(1, max_iter + 1):
        w = op.matvec(v)
        if not be.is_finite(w):
            return lam, res, v, it, False, f"non-finite Hessian-vector product (op.matvec) at iteration {it}"
        w = be.clone(w)
        kr.orthogonalise(be, w, deflate)
        new_lam = be.dot(v, w)
        if not math.isfinite(new_lam):
            return lam, res, v, it, False, f"non-finite Rayleigh quotient {new_lam} at iteration {it}"
        r = be.axpy(-new_lam, v, w)
        new_res = be.norm(r)
        if not math.isfinite(new_res):
            return lam, res, v, it, False, f"non-finite residual norm {new_res} at iteration {it}"
        lam, res = new_lam, new_res
        history.append(lam)
        logger.debug("power it=%d lambda=%.8g res/|lambda|=%.3g", it, lam, res / max(abs(lam), kr.TINY))
        if res <= tol * max(abs(lam), kr.TINY):
            return lam, res, v, it, True, None
        # r is orthogonal to v, so ||w||^2 = lambda^2 + ||r||^2 (saves a reduction)
        wn = math.hypot(lam, res)
        if wn == 0.0:  # A v = 0 exactly (handled by the test above unless tol < 0)
            return lam, res, v, it, True, None
        v = be.scale(1.0 / wn, w)
    return lam, res, v, max_iter, False, "max_iter"


def power_iteration(
    op: LinearOperator,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    v0: Vector | None = None,
) -> EigenResult:
    """The eigenvalue of largest magnitude by power iteration (one ``op.matvec`` per iteration).

    The eigenvalue is the Rayleigh quotient ``v^T A v`` of the unit iterate; converged when
    ``||A v - lambda v|| <= tol * |lambda|``. The convergence factor is ``|lambda_2 / lambda_1|`` per
    iteration, so a small gap needs many iterations (prefer :func:`lanczos`). A converged iterate is
    re-checked with a fresh product and probed for symmetry (2 products, counted in ``n_matvec``). The
    result's
    ``eigenvectors`` always holds the final iterate (it costs nothing); ``history`` the Rayleigh quotient
    after each iteration. On a non-finite product: ``converged=False``, ``reason`` names the iteration, and
    the eigenvalue is the last finite Rayleigh quotient (NaN if none).
    """
    be = op.backend
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    if not (tol >= 0.0):
        raise ValueError(f"tol={tol} must be >= 0 (relative residual tolerance, e.g. 1e-3)")
    v, failure = kr.start_vector(be, seed, v0)
    if v is None:
        logger.warning("power_iteration: %s; nothing computed", failure)
        return EigenResult((math.nan,), (math.nan,), False, 0, reason=failure)
    history: list[float] = []
    lam, res, v, n_matvec, converged, reason = _power(op, v, max_iter, tol, [], history)
    if converged:  # fresh-product residual and symmetry probe (2 products)
        true_res, fail, used = kr.check_ritz_pairs(op, (lam,), [v], tol, abs(lam), seed)
        n_matvec += used
        if fail is not None:
            converged, reason = False, fail
        res = true_res[0] if true_res else res
    if reason is not None and reason != "max_iter":
        logger.warning("power_iteration: %s; not converged", reason)
    return EigenResult(
        eigenvalues=(lam,),
        residuals=(res,),
        converged=converged,
        n_matvec=n_matvec,
        reason=reason,
        eigenvectors=[v] if converged or reason == "max_iter" else None,
        history=tuple(history),
    )


def deflated_power_iteration(
    op: LinearOperator,
    k: int = 5,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """Top-``k`` eigenpairs by power iteration with deflation, as PyHessian's ``eigenvalues(top_n=k)``.

    Kept as a comparison baseline for :func:`lanczos`. Eigenpair ``i`` runs power iteration from
    ``backend.randn(seed + i)`` on ``P A P``, ``P`` the projector orthogonal to the ``i`` eigenvectors
    already found (two Gram-Schmidt passes, one all-reduce each); ``max_iter`` and ``tol`` apply to each
    eigenpair (PyHessian's ``maxIter``/``tol``), with the residual criterion of :func:`power_iteration`
    on the deflated operator instead of PyHessian's relative change of the eigenvalue. Each pair
    converges to the largest *magnitude* eigenvalue of the deflated operator; the result is sorted by
    decreasing magnitude. ``n_matvec`` counts every operator application; ``history`` is the first
    pair's Rayleigh quotients. On a non-finite product the pairs found so far are returned, NaN-padded,
    with ``converged=False``.
    """
    be = op.backend
    n = be.dim
    if k < 1 or k > n:
        raise ValueError(f"k={k} must be in [1, dim={n}]")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    if not (tol >= 0.0):
        raise ValueError(f"tol={tol} must be >= 0 (relative residual tolerance, e.g. 1e-3)")
    vals: list[float] = []
    res: list[float] = []
    vecs: list[Vector] = []
    history: list[float] = []
    n_matvec = 0
    not_converged: list[int] = []
    for i in range(k):
        v = be.randn(seed + i)
        if not be.is_finite(v):  # cannot happen with a sane backend; never report it as a number
            return EigenResult(
                kr.pad(vals, k), kr.pad(res, k), False, n_matvec, reason=f"non-finite start vector {i}"
            )
        kr.orthogonalise(be, v, vecs)
        nrm = be.norm(v)
        if not (math.isfinite(nrm) and nrm > 0.0):
            reason = f"start vector {i} has norm {nrm} after deflation"
            return EigenResult(
                kr.pad(vals, k), kr.pad(res, k), False, n_matvec, reason=reason, history=tuple(history)
            )
        v = be.scale(1.0 / nrm, v)
        lam, r, v, used, ok, fail = _power(op, v, max_iter, tol, vecs, history if i == 0 else [])
        n_matvec += used
        if fail is not None and fail != "max_iter":
            reason = f"{fail} of eigenpair {i}"
            logger.warning("deflated_power_iteration: %s; not converged", reason)
            return EigenResult(
                kr.pad(vals, k), kr.pad(res, k), False, n_matvec, reason=reason, history=tuple(history)
            )
        if not ok:
            not_converged.append(i)
        # re-orthonormalise the converged vector against the previous ones before deflating with it
        kr.orthogonalise(be, v, vecs)
        v = be.scale(1.0 / be.norm(v), v)
        vals.append(lam)
        res.append(r)
        vecs.append(v)
    order = sorted(range(k), key=lambda j: -abs(vals[j]))
    final_reason = None if not not_converged else f"max_iter (eigenpairs {not_converged} not converged)"
    return EigenResult(
        eigenvalues=tuple(vals[j] for j in order),
        residuals=tuple(res[j] for j in order),
        converged=not not_converged,
        n_matvec=n_matvec,
        reason=final_reason,
        eigenvectors=[vecs[j] for j in order],
        history=tuple(history),
    )
