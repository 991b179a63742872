"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant 1994/2010; Ubaru, Chen & Saad
2017, SIMAX 38; Ghorbani, Krishnan & Xiao 2019, ICML). Each probe keeps its ``n_iter`` Lanczos vectors
(full reorthogonalisation: the quadrature weights need an orthonormal basis)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import scipy.integrate

from lrscale_megatron.curvature import krylov as kr
from lrscale_megatron.curvature.results import LinearOperator, SpectralDensity
from lrscale_megatron.curvature.vectors import Vector

logger = logging.getLogger(__name__)


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
        q, fail = kr.start_vector(be, seed + p, None)
        if q is None:
            failure = f"{fail} for probe {p}"
            break
        basis: list[Vector] = [q]
        alphas: list[float] = []
        offdiag: list[float] = []
        q_prev: Vector | None = None
        beta_prev, anorm = 0.0, 0.0
        for it in range(1, n_iter + 1):
            w, alpha, beta, fail = kr.lanczos_step(op, q, q_prev, beta_prev, basis)
            n_matvec += 1
            if w is None:
                failure = f"{fail} at iteration {it} of probe {p}"
                break
            alphas.append(alpha)
            anorm = max(anorm, math.hypot(alpha, beta), beta_prev)
            if it == n_iter or beta <= kr.breakdown_threshold(be, anorm):
                break
            q_prev, beta_prev, q = q, beta, be.scale(1.0 / beta, w)
            offdiag.append(beta)
            basis.append(q)
        if failure is not None:
            break
        theta, s = kr.tridiag_eig(alphas, offdiag)
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
