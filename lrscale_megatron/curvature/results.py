"""Result types and the operator protocol shared by the curvature algorithms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lrscale_megatron.curvature.vectors import Vector, VectorSpace


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator on the parameter space, applied to per-parameter vectors.

    ``matvec`` may return non-finite entries (a NaN loss, an overflow); the algorithms detect that
    through ``backend.is_finite`` and report it instead of returning a number.
    """

    @property
    def backend(self) -> VectorSpace: ...  # read-only member: an operator may hold any VectorSpace subtype

    def matvec(self, v: Vector) -> Vector: ...


@dataclass(frozen=True)
class EigenResult:
    """Outcome of an eigenvalue solver.

    Attributes:
        eigenvalues: the k requested eigenvalues, largest first (algebraically; see ``which``).
        residuals: ``||A y_i - theta_i y_i|| / ||y_i||`` for each Ritz pair, same order: from fresh
            products once a result was checked, else the solver's estimates.
        converged: the solver's residual estimates satisfied ``tol`` and the true residuals of the
            Ritz vectors (fresh products) ``residual <= 3 * tol * max(|theta_1|, tiny)``, and the
            symmetry probe passed (:mod:`lrscale_megatron.curvature.krylov`).
        n_matvec: operator applications spent.
        reason: why the solver stopped without converging (``"max_iter"``, ``"non-finite ..."``,
            ``"breakdown"`` is *not* a failure: an invariant subspace was found), ``None`` when converged.
        eigenvectors: Ritz vectors when requested, else ``None``.
        history: largest Ritz value after each iteration (for convergence plots).
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: bool
    n_matvec: int
    reason: str | None = None
    eigenvectors: list[Vector] | None = field(default=None, repr=False, compare=False)
    history: tuple[float, ...] = ()

    @property
    def lambda_max(self) -> float:
        return self.eigenvalues[0] if self.eigenvalues else float("nan")


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson trace estimate: ``estimate ± stderr`` from ``n_samples`` probes."""

    estimate: float
    stderr: float
    n_samples: int
    n_matvec: int
    converged: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: a Gaussian-smoothed spectral density on ``grid``.

    ``density`` integrates to 1 over ``grid`` (trapezoid). ``nodes``/``weights`` are the raw quadrature
    nodes and weights per probe (each probe's weights sum to 1).
    """

    grid: tuple[float, ...]
    density: tuple[float, ...]
    nodes: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    n_matvec: int
    converged: bool = True
    reason: str | None = None
