"""Hutchinson's stochastic trace estimator (Hutchinson 1989, Commun. Stat. Simul. Comput. 18) with
Rademacher probes. Nothing here calls ``torch.distributed``."""

from __future__ import annotations

import logging
import math

import numpy as np

from lrscale_megatron.curvature.results import LinearOperator, TraceResult

logger = logging.getLogger(__name__)


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
