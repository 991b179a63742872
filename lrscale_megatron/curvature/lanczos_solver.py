"""Lanczos eigensolver for a symmetric operator, with a stored, host-kept or recomputed Krylov basis.

Numerical sources:

- **Lanczos** (Lanczos 1950, J. Res. NBS 45). With ``basis="keep"``: **full reorthogonalisation**, two
  passes of classical Gram-Schmidt against every stored Lanczos vector ("twice is enough": Parlett, *The
  Symmetric Eigenvalue Problem*, 1998, sec. 6.9), one ``backend.dots`` all-reduce per pass.
- With ``basis="recompute"`` (``k=1``): the three-term recurrence only, and the Ritz vector is rebuilt by
  a **second pass** that regenerates the Lanczos vectors from the same start vector with the first pass's
  coefficients ("two-pass Lanczos": Cullum & Willoughby 1985, *Lanczos Algorithms for Large Symmetric
  Eigenvalue Computations*, vol. 1, ch. 4; Frommer & Simoncini 2008 for its use in matrix functions).
  Extra memory is three vectors (``q``, ``q_prev`` and the product) in the first pass and four in the
  second (plus the Ritz vector), whatever ``max_iter``: what a 1B-13B model can afford. Without
  reorthogonalisation a converged top Ritz value gets spurious copies ("ghosts"), which do not change the
  largest Ritz value; ``k=1`` only.
- With ``basis="host"`` (``k=1``; what ``"auto"`` picks when the host has room,
  :mod:`~lrscale_megatron.curvature.hostbasis`): the same three-term recurrence, but every Lanczos vector
  is copied to host memory as it is made, ``q_prev`` is read back from there, and the Ritz vector is
  combined from the host copies: no second pass, and the device holds ``q`` and the product only (two
  vectors fewer than the second pass's peak), whatever ``max_iter``. No reorthogonalisation against the
  host basis (it would stream ``j`` vectors back per iteration, ``O(m^2)`` transfers): for ``k=1`` the
  ghosts of the unreorthogonalised recurrence do not move the largest Ritz value, and the true-residual
  check below is what certifies the pair.
- **Residual estimates** ``|beta_m s_{m,i}|`` (Paige 1976; Parlett 1998, sec. 13.2) decide when to stop;
  a result is marked converged only after the true-residual and symmetry check of
  :func:`~lrscale_megatron.curvature.krylov.check_ritz_pairs`: ``k`` fresh products with a kept or host
  basis (the symmetry probe runs along the stored Lanczos vectors, whose products the recurrence
  knows), ``k + 1`` with the second pass (a random probe ``z`` and its product).

NaN/Inf safety: a non-finite operator product or scalar stops the solver at once with ``converged=False``
and a ``reason`` naming the iteration; the values reported are the last finite Ritz values (or NaN).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from lrscale_megatron.curvature import krylov as kr
from lrscale_megatron.curvature import norm_hint
from lrscale_megatron.curvature.basis_choice import StartHandoff, host_basis, resolve_basis, solve_scoped
from lrscale_megatron.curvature.results import EigenResult, LinearOperator
from lrscale_megatron.curvature.vectors import OffDeviceBasis, Vector

logger = logging.getLogger(__name__)

Which = Literal["LA", "SA", "LM"]
_WHICH = ("LA", "SA", "LM")


def _fresh(op: LinearOperator) -> bool:
    return bool(getattr(op, "returns_new_tensors", False))


def _probe(
    dots: Callable[[Sequence[Vector], int], list[list[float]]],
    cols: list[dict[int, float]],
    offdiag: list[float],
    m: int,
    what: str,
) -> kr.SymmetryProbe:
    """The product-free symmetry probe over the first ``m`` stored Lanczos vectors (krylov docstring)."""

    def probe(y: Vector, r: Vector, theta: float) -> tuple[float, str] | None:
        d = dots([y, r], m)
        asym, n = kr.recurrence_asymmetry(cols[: m - 1], offdiag, [x[0] for x in d], [x[1] for x in d], theta)
        return (asym, f"the {n} {what} Lanczos vectors") if n > 0 else None

    return probe


def _second_pass(
    op: LinearOperator,
    seed: int,
    v0: Vector | Callable[[], Vector | None] | None,
    alphas: list[float],
    offdiag: list[float],
    s: np.ndarray,
    bound: float,
) -> tuple[Vector | None, int, str | None]:
    """Rebuild the Ritz vector ``y = sum_j s_j q_j`` by regenerating ``q_2..q_m`` with the first pass's
    coefficients. Also re-derives each ``alpha_j``: a product that does not reproduce the first pass's
    (dropout, noise) is reported instead of silently giving another vector."""
    be = op.backend
    m = len(alphas)
    q, _ = kr.start_vector(be, seed, v0() if callable(v0) else v0)  # the first pass's, regenerated
    assert q is not None  # it was finite in the first pass
    y = be.scale(float(s[0]), q)
    q_prev: Vector | None = None
    n_matvec = 0
    for j in range(m - 1):
        aq = op.matvec(q)
        n_matvec += 1
        if not be.is_finite(aq):
            return None, n_matvec, f"non-finite product in the second (Ritz vector) pass at iteration {j + 1}"
        w = aq if _fresh(op) else be.clone(aq)
        del aq
        if q_prev is not None:
            be.axpy_(-offdiag[j - 1], q_prev, w)
        alpha = be.dot(q, w)
        if not (abs(alpha - alphas[j]) <= bound):
            return (
                None,
                n_matvec,
                f"products are not reproducible: the second Lanczos pass gives alpha_{j + 1}={alpha:.8g}, the "
                f"first {alphas[j]:.8g} (tolerance {bound:.3g}); the loss is not deterministic (dropout or "
                "other randomness) or the operator is not a fixed linear map",
            )
        be.axpy_(-alphas[j], q, w)
        be.scale_(1.0 / offdiag[j], w)
        q_prev, q = q, w
        be.axpy_(float(s[j + 1]), q, y)
    return y, n_matvec, None


@solve_scoped
def lanczos(
    op: LinearOperator,
    k: int = 1,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    which: Which = "LA",
    reorth: Literal["full", "none"] | None = None,
    return_vectors: bool = False,
    v0: Vector | Callable[[], Vector | None] | None = None,
    callback: Callable[[int, tuple[float, ...]], None] | None = None,
    basis: Literal["auto", "keep", "recompute", "host"] = "auto",
) -> EigenResult:
    """``k`` extreme eigenvalues of a symmetric operator by the Lanczos method.

    Args:
        op: symmetric operator; one ``op.matvec`` per iteration, plus the checks (below).
        k: number of eigenvalues wanted (``1 <= k <= min(max_iter, dim)``).
        max_iter: maximum Lanczos iterations (= Krylov dimension); capped at ``op.backend.dim``.
        tol: relative residual tolerance: converged when the ``k`` wanted Ritz pairs all satisfy
            ``||A y_i - theta_i y_i|| <= tol * max(|theta_1|, 1e-30)``. The estimate ``|beta_m s_{m,i}|``
            is checked every iteration; once it holds, the *true* residual of each Ritz vector is
            computed with a fresh product, and the operator's symmetry is probed (along the stored
            Lanczos vectors, no product; with the second pass, one more product on a random vector):
            only if both pass is the result ``converged``. Eigenvalue errors are
            about ``residual**2 / gap``, typically far below ``tol``.
        seed: seed of the random start vector ``backend.randn(seed)`` (restarts use ``seed + 1``, ...).
        which: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest algebraic (ascending),
            ``"LM"`` largest magnitude (descending ``|theta|``).
        reorth: ``"full"`` (reorthogonalise against the stored basis) or ``"none"`` (three-term
            recurrence only; loses orthogonality and produces "ghost" copies of converged Ritz values:
            use only for ``k=1``). Default: ``"full"`` with a kept basis, ``"none"`` with a recomputed one.
        return_vectors: also return the Ritz vectors.
        v0: start vector (normalised here) instead of a random one, e.g. a warm start; or a
            zero-argument callable returning one (``None``: random), called at the start and again by the
            second pass, so that with ``basis="recompute"`` no start vector stays alive during the solve
            (a vector passed as such is kept for the second pass: one vector more).
        callback: ``callback(iteration, ritz_values)`` after each iteration (1-based), most wanted first.
        basis: ``"keep"`` stores every Lanczos vector (memory ``max_iter`` vectors, no extra products);
            ``"recompute"`` (``k=1`` only) stores none and rebuilds the Ritz vector by a second pass
            (memory bounded by 4 vectors for any ``max_iter``; about twice the products); ``"host"``
            (``k=1`` only) stores them in host memory (device: 2 vectors for any ``max_iter``, 3 with
            the fd anchor a ``HessianOperator`` is lent for the solve; host: ``max_iter``; no extra
            products; refused when the host budget is too small or the backend has none); ``"auto"``
            (default): for ``k=1`` (unless ``reorth="full"``) ``"host"`` when the
            backend offers one within its budget on every rank, else ``"recompute"`` (logged at INFO,
            with the reason); ``"keep"`` otherwise.

    Returns:
        :class:`EigenResult` with the ``k`` wanted Ritz values (most wanted first), their residuals (the
        true residuals once checked, else the estimates), ``n_matvec`` (every product, checks
        included), ``history`` (most wanted Ritz value per iteration). ``reason``: ``None`` when
        converged, ``"max_iter"``, the non-finite quantity and iteration, or the failed check.

    Breakdown (``beta ~ 0``): the Krylov space is invariant. With at least ``k`` Ritz values the solver
    stops (and still runs the check); with fewer it restarts from a random vector orthogonal to all
    previous ones (kept basis only). A single start vector cannot see an eigenvalue's multiplicity.
    """
    be = op.backend
    if which not in _WHICH:
        raise ValueError(f"which={which!r} is not supported; use one of {_WHICH}")
    kept, reorth_mode = resolve_basis(basis, reorth, k)
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

    if isinstance(v0, StartHandoff):
        v0 = v0.take()
    q, failure = kr.start_vector(be, seed, v0() if callable(v0) else v0)
    if q is None:
        logger.warning("lanczos: %s; nothing computed", failure)
        return EigenResult(kr.pad([], k), kr.pad([], k), False, 0, reason=failure)

    hb: OffDeviceBasis | None = None
    if kept in ("host", "auto1"):
        hb, _ = host_basis(be, kept, max_iter)
        kept = "host" if hb is not None else "recompute"
        allow_anchor = getattr(op, "allow_anchor", None)  # device: q, the product and the fd anchor
        if hb is not None and allow_anchor is not None:
            allow_anchor()
    keep = kept == "keep"
    stored: list[Vector] = [q] if keep else []
    if hb is not None:
        hb.append(q)
    cols: list[dict[int, float]] = []  # coefficients of A q_j along q_i (kept / host basis: symmetry probe)
    coeffs: list[float] = []
    alphas: list[float] = []
    offdiag: list[float] = []
    history: list[float] = []
    q_prev: Vector | None = None
    beta_prev = 0.0
    anorm = 0.0  # running lower bound on ||A|| (scale for the breakdown test)
    n_matvec = 0
    n_restart = 0
    estimate_ok = False
    reason: str | None = "max_iter"
    best_vals: tuple[float, ...] = ()
    best_res: tuple[float, ...] = ()
    best_s: np.ndarray | None = None
    if kept != "recompute":
        v0 = None  # only the second pass regenerates the start vector: do not keep it alive

    for it in range(1, max_iter + 1):
        j_prev = it - 2
        norm_hint.remember(q, 1.0)  # q is unit and finite here (normalised by a finite beta > 0)
        w, alpha, beta, fail = kr.lanczos_step(
            op,
            q,
            q_prev,
            beta_prev,
            stored if reorth_mode == "full" else None,
            prev_axpy=(lambda a, v: hb.axpy_(a, j_prev, v)) if hb is not None and it > 1 else None,  # noqa: B023
            coeffs_out=coeffs,
        )
        n_matvec += 1
        if w is None:
            reason = f"{fail} at iteration {it}"
            del w
            logger.warning("lanczos: %s; returning the last finite Ritz values, not converged", reason)
            best_s = None
            break
        alphas.append(alpha)
        if reorth_mode == "full":  # A q_j = beta_prev q_prev + sum_i c_i q_i + beta q_{j+1}
            col = {i: c for i, c in enumerate(coeffs)}
            if q_prev is not None:
                col[it - 2] = col.get(it - 2, 0.0) + beta_prev
        else:  # A q_j = beta_prev q_prev + alpha q_j + beta q_{j+1}
            col = {it - 1: alpha} if it == 1 else {it - 2: beta_prev, it - 1: alpha}
        cols.append(col)
        theta, s = kr.tridiag_eig(alphas, offdiag)
        m = len(alphas)
        res_all = np.abs(beta * s[-1, :])
        idx = kr.order(theta, which)
        wanted = idx[:k]
        best_vals = tuple(float(x) for x in theta[wanted])
        best_res = tuple(float(x) for x in res_all[wanted])
        best_s = s[:, wanted]
        history.append(float(theta[idx[0]]))
        if callback is not None:
            callback(it, tuple(float(x) for x in theta[idx]))

        anorm = max(anorm, float(np.max(np.abs(theta))), math.hypot(alpha, beta), beta_prev)
        scale = max(abs(best_vals[0]), kr.TINY)
        logger.debug(
            "lanczos it=%d theta_1=%.8g max_res/scale=%.3g beta=%.3g",
            it,
            best_vals[0],
            max(best_res) / scale,
            beta,
        )
        invariant = beta <= kr.breakdown_threshold(be, anorm) or m == n
        if m >= k and (invariant or all(r <= tol * scale for r in best_res)):
            estimate_ok, reason = True, None
            del w
            break
        if it == max_iter:
            del w
            break
        if invariant:  # fewer than k Ritz values: restart orthogonally to everything seen so far
            if reorth_mode != "full":
                reason = (
                    f"breakdown at iteration {it} with {m} < k={k} Ritz values (reorth='none' cannot restart)"
                )
                break
            n_restart += 1
            r = be.randn(seed + n_restart)
            kr.orthogonalise(be, r, stored)
            rn = be.norm(r)
            if not (math.isfinite(rn) and rn > 0.0):
                reason = f"restart after breakdown at iteration {it} failed (norm={rn})"
                break
            q_prev, beta_prev, q = None, 0.0, be.scale_(1.0 / rn, r)
            offdiag.append(0.0)
        else:
            q_prev, beta_prev, q = (None if hb is not None else q), beta, be.scale_(1.0 / beta, w)
            offdiag.append(beta)
        del w
        if keep:
            stored.append(q)
        if hb is not None:
            hb.append(q)

    if not estimate_ok and reason == "max_iter":
        logger.info("lanczos: not converged after %d iterations (residual estimates %s)", n_matvec, best_res)
    # ------------------------------------------------------------------ Ritz vectors and the check
    vectors: list[Vector] | None = None
    converged = False
    if best_s is not None and (estimate_ok or return_vectors):
        m = best_s.shape[0]
        scale = max(abs(best_vals[0]), kr.TINY)
        bound = max(tol * scale, kr.breakdown_threshold(be, max(anorm, scale)))
        probe: kr.SymmetryProbe | None = None
        if keep:
            vectors = [be.combine(best_s[:, i].tolist(), stored[:m]) for i in range(best_s.shape[1])]
            basis_now = stored[:m]
            probe = _probe(
                lambda xs, n: [list(t) for t in zip(*(be.dots(basis_now[:n], x) for x in xs))],
                cols,
                offdiag,
                m,
                "stored",
            )
        elif hb is not None:
            del q, q_prev
            vectors = [hb.combine(best_s[:, 0].tolist())]
            probe = _probe(hb.dots, cols, offdiag, m, "host-stored")
        else:
            del q, q_prev
            y, used, fail2 = _second_pass(op, seed, v0, alphas[:m], offdiag[: m - 1], best_s[:, 0], bound)
            n_matvec += used
            if y is None:
                estimate_ok, reason = False, fail2
                logger.warning("lanczos: %s; not converged", reason)
            else:
                vectors = [y]
        if estimate_ok and vectors is not None:
            true_res, fail3, used = kr.check_ritz_pairs(op, best_vals, vectors, tol, anorm, seed, probe)
            n_matvec += used
            best_res = tuple(true_res) + best_res[len(true_res) :]
            if fail3 is None:
                converged = True
            else:
                reason = fail3
                logger.warning("lanczos: %s; not converged", reason)
        stored = []
    if hb is not None:
        hb.release()
    return EigenResult(
        eigenvalues=kr.pad(best_vals, k),
        residuals=kr.pad(best_res, k),
        converged=converged,
        n_matvec=n_matvec,
        reason=reason,
        eigenvectors=vectors if return_vectors else None,
        history=tuple(history),
    )
