"""Krylov eigensolvers, trace and spectral-density estimators, generic over a :class:`VectorBackend`.

Every function takes a symmetric :class:`~lrscale_megatron.curvature.results.LinearOperator` and touches
vectors only through ``op.backend`` (``dot``/``dots``/``norm``/``is_finite`` reduce over the model-parallel
group; ``axpy``/``scale``/``combine`` are local). Nothing here calls ``torch.distributed``: the same code
runs unsharded, under tensor/pipeline parallelism, or in a test on a dense matrix.

Numerical sources:

- **Lanczos** (Lanczos 1950, "An iteration method for the solution of the eigenvalue problem of linear
  differential and integral operators", J. Res. NBS 45) with **full reorthogonalisation**: two passes of
  classical Gram-Schmidt against every stored Lanczos vector ("twice is enough": Parlett, *The Symmetric
  Eigenvalue Problem*, 1998, sec. 6.9; Giraud, Langou & Rozloznik 2005). Each pass costs one
  ``backend.dots`` call, i.e. one all-reduce, whatever the number of stored vectors.
- **Residual estimates** ``||A y_i - theta_i y_i|| = |beta_m s_{m,i}|`` from the last row of the tridiagonal
  eigenvector matrix (Paige 1976, "Error analysis of the Lanczos algorithm for tridiagonalizing a
  symmetric matrix", IMA J. Appl. Math. 18; Parlett 1998, sec. 13.2). With full reorthogonalisation the
  estimate equals the true residual up to rounding; no extra operator application is spent on it.
- **Hutchinson trace estimator** with Rademacher probes (Hutchinson 1989, "A stochastic estimator of the
  trace of the influence matrix for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18).
- **Stochastic Lanczos quadrature** (Golub & Meurant 1994/2010 for Gauss quadrature from Lanczos; Ubaru,
  Chen & Saad 2017, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", SIMAX 38; Ghorbani,
  Krishnan & Xiao 2019, "An investigation into neural net optimization via Hessian eigenvalue density",
  ICML) for the spectral density.
- **Deflated power iteration** as in PyHessian (Yao et al. 2020), kept as a comparison baseline.

NaN/Inf safety: a non-finite operator product (NaN loss, overflow) or a non-finite scalar stops the
solver at once. The result then has ``converged=False`` and a ``reason`` naming the iteration; the values
reported are the last *finite* estimates (or NaN when there are none). A non-finite product is never
turned into a number labelled converged, and no ``nan_to_num`` or epsilon fudge is applied anywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import scipy.integrate
import scipy.linalg
import torch

from lrscale_megatron.curvature.backend import Vector, VectorBackend
from lrscale_megatron.curvature.results import EigenResult, LinearOperator, SpectralDensity, TraceResult

logger = logging.getLogger(__name__)

__all__ = [
    "deflated_power_iteration",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "slq_density",
]

Which = Literal["LA", "SA", "LM"]
_WHICH = ("LA", "SA", "LM")
_REORTH = ("full", "none")

#: floor of the convergence scale ``max(|theta_1|, _TINY)`` (as in ``EigenResult.converged``).
_TINY = 1e-30
#: A Lanczos residual ``beta <= _BREAKDOWN_EPS_FACTOR * eps(dtype) * ||T||`` means the Krylov space is
#: invariant to working precision (a "lucky breakdown"). 100 eps leaves room for the rounding of a
#: reorthogonalised vector (about sqrt(m) eps ||A||) without taking a genuinely small beta for zero.
_BREAKDOWN_EPS_FACTOR = 100.0


# ---------------------------------------------------------------------------------------------- helpers
def _check_vector(backend: VectorBackend, v: Vector, what: str) -> None:
    if len(v) != len(backend.specs):
        raise ValueError(
            f"{what} has {len(v)} tensors but the operator has {len(backend.specs)} parameters; "
            "pass one tensor per parameter, in operator order"
        )
    for i, (t, spec) in enumerate(zip(v, backend.specs)):
        if tuple(t.shape) != tuple(spec.shape):
            raise ValueError(
                f"{what}[{i}] ({spec.name}) has shape {tuple(t.shape)}, expected this rank's shard shape "
                f"{tuple(spec.shape)}"
            )


def _start_vector(backend: VectorBackend, seed: int, v0: Vector | None) -> tuple[Vector | None, str | None]:
    """Unit start vector (``v0`` or ``backend.randn(seed)``), or ``(None, reason)`` if it is not finite."""
    if v0 is None:
        v = backend.randn(seed)
        what = f"random start vector (seed={seed})"
    else:
        _check_vector(backend, v0, "v0")
        v = [t.to(dtype=backend.dtype, device=backend.device) for t in v0]
        what = "start vector v0"
    if not backend.is_finite(v):
        return None, f"non-finite {what}"
    nrm = backend.norm(v)
    if not math.isfinite(nrm):
        return None, f"non-finite norm of {what}"
    if nrm == 0.0:
        raise ValueError(f"{what} is zero; pass a nonzero v0 (or v0=None for a random start)")
    return backend.scale(1.0 / nrm, v), None


def _orthogonalise(backend: VectorBackend, w: Vector, basis: Sequence[Vector]) -> list[float]:
    """In place: ``w -= Q Q^T w`` by two classical Gram-Schmidt passes (one all-reduce each).

    Returns the total coefficients ``Q^T w`` removed (sum over both passes).
    """
    total = [0.0] * len(basis)
    if not basis:
        return total
    for _ in range(2):  # "twice is enough" (Parlett 1998, sec. 6.9)
        coeffs = backend.dots(basis, w)
        for i, (c, q) in enumerate(zip(coeffs, basis)):
            backend.axpy_(-c, q, w)
            total[i] += c
    return total


def _tridiag_eig(alphas: Sequence[float], offdiag: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T (float64)."""
    d = np.asarray(alphas, dtype=np.float64)
    e = np.asarray(offdiag, dtype=np.float64)
    theta, s = scipy.linalg.eigh_tridiagonal(d, e)
    return np.asarray(theta), np.asarray(s)


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` with the most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")  # "LM"


def _pad(values: Sequence[float], k: int) -> tuple[float, ...]:
    out = [float(x) for x in values[:k]]
    return tuple(out + [math.nan] * (k - len(out)))


def _breakdown_threshold(backend: VectorBackend, anorm: float) -> float:
    eps = torch.finfo(backend.dtype).eps
    return _BREAKDOWN_EPS_FACTOR * eps * anorm


def _lanczos_step(
    op: LinearOperator,
    q: Vector,
    q_prev: Vector | None,
    beta_prev: float,
    basis: Sequence[Vector] | None,
) -> tuple[Vector | None, float, float, str | None]:
    """One Lanczos step from the unit vector ``q`` (``basis[-1] is q`` when reorthogonalising).

    Returns ``(w, alpha, beta, failure)``: ``w`` is the new residual vector ``A q - alpha q - beta_prev
    q_prev`` (orthogonalised against ``basis`` when given), ``beta = ||w||``. On a non-finite product or
    scalar, ``w`` is ``None`` and ``failure`` says what was non-finite.
    """
    be = op.backend
    aq = op.matvec(q)
    if not be.is_finite(aq):
        return None, math.nan, math.nan, "non-finite Hessian-vector product (op.matvec)"
    # new tensors: the operator's output may be a buffer it reuses
    w = be.axpy(-beta_prev, q_prev, aq) if q_prev is not None else be.clone(aq)
    if basis is None:  # local three-term recurrence only
        alpha = be.dot(q, w)
        if math.isfinite(alpha):
            be.axpy_(-alpha, q, w)
    else:  # full reorthogonalisation; alpha = q^T w is the last Gram-Schmidt coefficient
        alpha = _orthogonalise(be, w, basis)[-1]
    if not math.isfinite(alpha):
        return None, alpha, math.nan, f"non-finite Rayleigh quotient alpha={alpha}"
    beta = be.norm(w)
    if not math.isfinite(beta):
        return None, alpha, beta, f"non-finite Lanczos residual norm beta={beta}"
    return w, alpha, beta, None


# ---------------------------------------------------------------------------------------------- Lanczos
def lanczos(
    op: LinearOperator,
    k: int = 1,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    which: Which = "LA",
    reorth: Literal["full", "none"] = "full",
    return_vectors: bool = False,
    v0: Vector | None = None,
    callback: Callable[[int, tuple[float, ...]], None] | None = None,
) -> EigenResult:
    """``k`` extreme eigenvalues of a symmetric operator by the Lanczos method.

    Args:
        op: symmetric operator; one ``op.matvec`` per iteration.
        k: number of eigenvalues wanted (``1 <= k <= min(max_iter, dim)``).
        max_iter: maximum Lanczos iterations (= operator applications = Krylov dimension); capped at the
            dimension of the space, ``op.backend.dim``.
        tol: relative residual tolerance: converged when the ``k`` wanted Ritz pairs all satisfy
            ``|beta_m s_{m,i}| <= tol * max(|theta_1|, 1e-30)`` (``theta_1`` the most wanted Ritz value).
            Checked every iteration from iteration ``k`` on; the solver stops as soon as it holds. Since
            eigenvalue errors are about ``residual**2 / gap``, the eigenvalues are typically far more
            accurate than ``tol``.
        seed: seed of the random start vector ``backend.randn(seed)`` (and, after a breakdown with fewer
            than ``k`` Ritz values, of the restart vectors ``randn(seed + 1)``, ...).
        which: ``"LA"`` largest algebraic (returned in descending order), ``"SA"`` smallest algebraic
            (ascending), ``"LM"`` largest magnitude (descending ``|theta|``).
        reorth: ``"full"`` (default) stores every Lanczos vector and reorthogonalises against all of them
            (memory: ``max_iter`` vectors); ``"none"`` uses the three-term recurrence only (memory: 3
            vectors unless ``return_vectors``), which loses orthogonality once a Ritz value converges
            and then produces spurious copies ("ghosts") of it: use only for ``k=1`` or for comparison.
        return_vectors: also return the Ritz vectors ``y_i = Q_m s_i`` (via ``backend.combine``).
        v0: start vector (normalised here) instead of a random one, e.g. a warm start.
        callback: ``callback(iteration, ritz_values)`` after each iteration (1-based), with all current
            Ritz values, most wanted first.

    Returns:
        :class:`EigenResult` with the ``k`` wanted Ritz values (most wanted first), their residual
        estimates, ``n_matvec``, and ``history`` = the most wanted Ritz value after each iteration (the
        largest one for ``which="LA"``). ``reason`` is ``"max_iter"`` when the tolerance was not reached,
        or names the non-finite quantity and iteration; in that case the eigenvalues are the last finite
        Ritz values (NaN-padded to ``k``), ``converged`` is ``False`` and ``eigenvectors`` is ``None``.

    Breakdown (``beta ~ 0``): the Krylov space is invariant and its Ritz pairs are exact. With at least
    ``k`` Ritz values the solver stops (``converged=True``, residuals are the tiny estimates actually
    computed); with fewer it restarts from a random vector orthogonal to all previous ones (``reorth=
    "full"`` only). A single start vector cannot see an eigenvalue's multiplicity before such a
    breakdown: ``diag(5, 5, 1)`` with ``k=2`` gives ``(5, 1)``, as for every single-vector Krylov method.
    """
    be = op.backend
    if which not in _WHICH:
        raise ValueError(f"which={which!r} is not supported; use one of {_WHICH}")
    if reorth not in _REORTH:
        raise ValueError(f"reorth={reorth!r} is not supported; use one of {_REORTH}")
    if not (tol >= 0.0):
        raise ValueError(f"tol={tol} must be >= 0 (relative residual tolerance, e.g. 1e-3)")
    n = be.dim
    if k < 1 or k > n:
        raise ValueError(f"k={k} must be in [1, dim={n}]")
    if max_iter < k:
        raise ValueError(
            f"max_iter={max_iter} < k={k}: Lanczos needs at least k iterations for k Ritz values"
        )
    max_iter = min(max_iter, n)

    q, failure = _start_vector(be, seed, v0)
    if q is None:
        logger.warning("lanczos: %s; nothing computed", failure)
        return EigenResult(_pad([], k), _pad([], k), False, 0, reason=failure)

    keep_all = reorth == "full" or return_vectors
    basis: list[Vector] = [q]
    alphas: list[float] = []
    offdiag: list[float] = []
    history: list[float] = []
    q_prev: Vector | None = None
    beta_prev = 0.0
    anorm = 0.0  # running lower bound on ||A|| (scale for the breakdown test)
    n_matvec = 0
    n_restart = 0
    converged = False
    reason: str | None = "max_iter"
    best_vals: tuple[float, ...] = ()
    best_res: tuple[float, ...] = ()
    best_s: np.ndarray | None = None

    for it in range(1, max_iter + 1):
        w, alpha, beta, fail = _lanczos_step(op, q, q_prev, beta_prev, basis if reorth == "full" else None)
        n_matvec += 1
        if w is None:
            reason = f"{fail} at iteration {it}"
            logger.warning("lanczos: %s; returning the last finite Ritz values, not converged", reason)
            best_s = None
            break
        alphas.append(alpha)
        theta, s = _tridiag_eig(alphas, offdiag)
        m = len(alphas)
        res_all = np.abs(beta * s[-1, :])
        order = _order(theta, which)
        wanted = order[:k]
        best_vals = tuple(float(x) for x in theta[wanted])
        best_res = tuple(float(x) for x in res_all[wanted])
        best_s = s[:, wanted]
        history.append(float(theta[order[0]]))
        if callback is not None:
            callback(it, tuple(float(x) for x in theta[order]))

        anorm = max(anorm, float(np.max(np.abs(theta))), math.hypot(alpha, beta), beta_prev)
        scale = max(abs(best_vals[0]), _TINY)
        logger.debug(
            "lanczos it=%d theta_1=%.8g max_res/scale=%.3g beta=%.3g",
            it,
            best_vals[0],
            max(best_res) / scale,
            beta,
        )
        invariant = beta <= _breakdown_threshold(be, anorm) or m == n
        if invariant and m >= k:
            converged, reason = True, None
            logger.debug("lanczos: invariant subspace of dimension %d at iteration %d", m, it)
            break
        if m >= k and all(r <= tol * scale for r in best_res):
            converged, reason = True, None
            break
        if it == max_iter:
            break
        if invariant:  # fewer than k Ritz values: restart orthogonally to everything seen so far
            if reorth != "full":
                reason = (
                    f"breakdown at iteration {it} with {m} < k={k} Ritz values (reorth='none' cannot restart)"
                )
                break
            n_restart += 1
            r = be.randn(seed + n_restart)
            _orthogonalise(be, r, basis)
            rn = be.norm(r)
            if not (math.isfinite(rn) and rn > 0.0):
                reason = f"restart after breakdown at iteration {it} failed (norm={rn})"
                break
            q_prev, beta_prev, q = None, 0.0, be.scale(1.0 / rn, r)
            offdiag.append(0.0)
        else:
            q_prev, beta_prev, q = q, beta, be.scale(1.0 / beta, w)
            offdiag.append(beta)
        if keep_all:
            basis.append(q)
        else:
            basis = [q]

    if not converged and reason == "max_iter":
        logger.info("lanczos: not converged after %d iterations (residuals %s)", n_matvec, best_res)
    vectors = None
    if return_vectors and best_s is not None:
        m = best_s.shape[0]
        vectors = [be.combine(best_s[:, i].tolist(), basis[:m]) for i in range(best_s.shape[1])]
    return EigenResult(
        eigenvalues=_pad(best_vals, k),
        residuals=_pad(best_res, k),
        converged=converged,
        n_matvec=n_matvec,
        reason=reason,
        eigenvectors=vectors,
        history=tuple(history),
    )


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
        _orthogonalise(be, w, deflate)
        new_lam = be.dot(v, w)
        if not math.isfinite(new_lam):
            return lam, res, v, it, False, f"non-finite Rayleigh quotient {new_lam} at iteration {it}"
        r = be.axpy(-new_lam, v, w)
        new_res = be.norm(r)
        if not math.isfinite(new_res):
            return lam, res, v, it, False, f"non-finite residual norm {new_res} at iteration {it}"
        lam, res = new_lam, new_res
        history.append(lam)
        logger.debug("power it=%d lambda=%.8g res/|lambda|=%.3g", it, lam, res / max(abs(lam), _TINY))
        if res <= tol * max(abs(lam), _TINY):
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
    iteration, so a small gap needs many iterations (prefer :func:`lanczos`). The result's
    ``eigenvectors`` always holds the final iterate (it costs nothing); ``history`` the Rayleigh quotient
    after each iteration. On a non-finite product: ``converged=False``, ``reason`` names the iteration, and
    the eigenvalue is the last finite Rayleigh quotient (NaN if none).
    """
    be = op.backend
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    if not (tol >= 0.0):
        raise ValueError(f"tol={tol} must be >= 0 (relative residual tolerance, e.g. 1e-3)")
    v, failure = _start_vector(be, seed, v0)
    if v is None:
        logger.warning("power_iteration: %s; nothing computed", failure)
        return EigenResult((math.nan,), (math.nan,), False, 0, reason=failure)
    history: list[float] = []
    lam, res, v, n_matvec, converged, reason = _power(op, v, max_iter, tol, [], history)
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
                _pad(vals, k), _pad(res, k), False, n_matvec, reason=f"non-finite start vector {i}"
            )
        _orthogonalise(be, v, vecs)
        nrm = be.norm(v)
        if not (math.isfinite(nrm) and nrm > 0.0):
            reason = f"start vector {i} has norm {nrm} after deflation"
            return EigenResult(
                _pad(vals, k), _pad(res, k), False, n_matvec, reason=reason, history=tuple(history)
            )
        v = be.scale(1.0 / nrm, v)
        lam, r, v, used, ok, fail = _power(op, v, max_iter, tol, vecs, history if i == 0 else [])
        n_matvec += used
        if fail is not None and fail != "max_iter":
            reason = f"{fail} of eigenpair {i}"
            logger.warning("deflated_power_iteration: %s; not converged", reason)
            return EigenResult(
                _pad(vals, k), _pad(res, k), False, n_matvec, reason=reason, history=tuple(history)
            )
        if not ok:
            not_converged.append(i)
        # re-orthonormalise the converged vector against the previous ones before deflating with it
        _orthogonalise(be, v, vecs)
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


# ---------------------------------------------------------------------------------------------- trace
def hutchinson_trace(
    op: LinearOperator,
    n_samples: int = 100,
    seed: int = 0,
    tol: float | None = None,
) -> TraceResult:
    """Hutchinson's estimator ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher probes.

    Probe ``i`` is ``backend.rademacher(seed + i)``; one ``op.matvec`` per probe. ``stderr`` is the
    sample standard deviation (ddof=1) over ``sqrt(n)``, NaN for a single sample. With ``tol`` given, the
    loop stops early once at least 10 probes give ``stderr <= tol * |estimate|`` (``converged=True``);
    if ``n_samples`` probes do not reach it, ``converged=False`` with ``reason="max_samples"``. With
    ``tol=None`` all ``n_samples`` probes run and the result is ``converged=True``. A non-finite product
    or quadratic form stops the loop: ``converged=False``, ``reason`` names the probe, and the estimate
    is over the finite probes before it (NaN if none).
    """
    be = op.backend
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if tol is not None and not (tol > 0.0):
        raise ValueError(f"tol={tol} must be > 0 (relative standard error, e.g. 1e-2) or None")
    samples: list[float] = []
    n_matvec = 0
    failure: str | None = None

    def stats() -> tuple[float, float]:
        if not samples:
            return math.nan, math.nan
        x = np.asarray(samples, dtype=np.float64)
        se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
        return float(np.mean(x)), se

    for i in range(n_samples):
        z = be.rademacher(seed + i)
        az = op.matvec(z)
        n_matvec += 1
        if not be.is_finite(az):
            failure = f"non-finite Hessian-vector product (op.matvec) at probe {i + 1}"
            break
        quad = be.dot(z, az)
        if not math.isfinite(quad):
            failure = f"non-finite quadratic form z^T A z={quad} at probe {i + 1}"
            break
        samples.append(quad)
        if tol is not None and len(samples) >= 10:
            est, se = stats()
            if se <= tol * abs(est):
                logger.debug("hutchinson: stderr %.3g <= tol*|est| after %d probes", se, len(samples))
                return TraceResult(est, se, len(samples), n_matvec, converged=True)
    est, se = stats()
    if failure is not None:
        logger.warning(
            "hutchinson_trace: %s; estimate over %d finite probes, not converged", failure, len(samples)
        )
        return TraceResult(est, se, len(samples), n_matvec, converged=False, reason=failure)
    if tol is not None:
        return TraceResult(est, se, len(samples), n_matvec, converged=False, reason="max_samples")
    return TraceResult(est, se, len(samples), n_matvec, converged=True)


# ---------------------------------------------------------------------------------------------- SLQ
def _gaussian_density(
    grid: np.ndarray, nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], sigma: float
) -> np.ndarray:
    dens = np.zeros_like(grid)
    for th, wt in zip(nodes, weights):
        z = (grid[:, None] - th[None, :]) / sigma
        dens += (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))) @ wt
    dens /= len(nodes)
    return dens


def slq_density(
    op: LinearOperator,
    n_probes: int = 4,
    n_iter: int = 30,
    seed: int = 0,
    grid: Sequence[float] | None = None,
    n_grid: int = 512,
    sigma: float | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each probe ``p`` (``backend.randn(seed + p)``, normalised) ``n_iter`` Lanczos steps with full
    reorthogonalisation give a tridiagonal ``T``; its eigenvalues are the Gauss quadrature nodes and
    the squared first components of its eigenvectors the weights (they sum to 1), so that
    ``sum_i w_i f(theta_i) ~ v^T f(A) v`` exactly for polynomials of degree ``< 2 n_iter``. The density is
    the probe average of ``sum_i w_i N(x; theta_i, sigma^2)`` on ``grid``, renormalised so that its
    trapezoid integral over ``grid`` is 1 (this only removes the Gaussian tails cut off by the grid).

    Args:
        n_probes: number of random probes (the density's statistical error falls as ``1/sqrt(n_probes)``).
        n_iter: Lanczos steps per probe (capped at the dimension; a breakdown stops a probe early, its
            quadrature then being exact). Operator applications: ``n_probes * n_iter`` at most.
        grid: evaluation points (increasing); default ``n_grid`` points on
            ``[min node - 3 sigma, max node + 3 sigma]``.
        sigma: Gaussian smoothing width; default ``0.01 * (max node - min node)``, or
            ``0.01 * max |node|`` when all nodes coincide, or ``0.01`` when they are all zero.

    On a non-finite product the failing probe is discarded, the density is built from the completed
    probes (all-NaN if none; an empty grid if none and no ``grid`` was given) and ``converged=False``
    with ``reason`` naming the probe and iteration.
    """
    be = op.backend
    if n_probes < 1:
        raise ValueError(f"n_probes={n_probes} must be >= 1")
    if n_iter < 1:
        raise ValueError(f"n_iter={n_iter} must be >= 1")
    if grid is None and n_grid < 2:
        raise ValueError(f"n_grid={n_grid} must be >= 2")
    if sigma is not None and not (sigma > 0.0):
        raise ValueError(f"sigma={sigma} must be > 0 (Gaussian smoothing width in eigenvalue units) or None")
    n = be.dim
    n_iter = min(n_iter, n)

    all_nodes: list[np.ndarray] = []
    all_weights: list[np.ndarray] = []
    n_matvec = 0
    failure: str | None = None
    for p in range(n_probes):
        q, fail = _start_vector(be, seed + p, None)
        if q is None:
            failure = f"{fail} for probe {p}"
            break
        basis: list[Vector] = [q]
        alphas: list[float] = []
        offdiag: list[float] = []
        q_prev: Vector | None = None
        beta_prev, anorm = 0.0, 0.0
        for it in range(1, n_iter + 1):
            w, alpha, beta, fail = _lanczos_step(op, q, q_prev, beta_prev, basis)
            n_matvec += 1
            if w is None:
                failure = f"{fail} at iteration {it} of probe {p}"
                break
            alphas.append(alpha)
            anorm = max(anorm, math.hypot(alpha, beta), beta_prev)
            if it == n_iter or beta <= _breakdown_threshold(be, anorm):
                break
            q_prev, beta_prev, q = q, beta, be.scale(1.0 / beta, w)
            offdiag.append(beta)
            basis.append(q)
        if failure is not None:
            break
        theta, s = _tridiag_eig(alphas, offdiag)
        all_nodes.append(theta)
        all_weights.append(s[0, :] ** 2)
        logger.debug("slq probe %d: %d nodes in [%.6g, %.6g]", p, theta.size, theta[0], theta[-1])

    if failure is not None:
        logger.warning(
            "slq_density: %s; density from %d completed probes, not converged", failure, len(all_nodes)
        )

    if all_nodes:
        lo = float(min(th[0] for th in all_nodes))
        hi = float(max(th[-1] for th in all_nodes))
        if sigma is None:
            spread = hi - lo
            if spread <= 0.0:
                spread = max(abs(lo), abs(hi))
            sigma = 0.01 * spread if spread > 0.0 else 0.01
        x = (
            np.linspace(lo - 3.0 * sigma, hi + 3.0 * sigma, n_grid)
            if grid is None
            else np.asarray(grid, dtype=np.float64)
        )
        dens = _gaussian_density(x, all_nodes, all_weights, sigma)
        mass = float(scipy.integrate.trapezoid(dens, x))
        if mass > 0.0 and math.isfinite(mass):
            dens = dens / mass
        elif failure is None:
            failure = f"density has no mass on the grid (trapezoid integral {mass}); widen grid or sigma"
    else:
        x = np.asarray(grid, dtype=np.float64) if grid is not None else np.zeros(0)
        dens = np.full_like(x, math.nan)

    return SpectralDensity(
        grid=tuple(float(v) for v in x),
        density=tuple(float(v) for v in dens),
        nodes=tuple(tuple(float(v) for v in th) for th in all_nodes),
        weights=tuple(tuple(float(v) for v in wt) for wt in all_weights),
        n_matvec=n_matvec,
        converged=failure is None,
        reason=failure,
    )
