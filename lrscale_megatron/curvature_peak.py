"""The curvature predictor of the peak LR: ``eta_curv = kappa / lambda_max``, kappa from a proxy ladder.

Edge-of-stability reasoning (Cohen et al. 2021, 2022): the usable LR scales like ``1 / lambda_max``, so on a
ladder of proxies each trained at its own optimal LR ``eta*_i`` the product ``kappa_i = eta*_i * lambda_i``
(``lambda_i`` measured after warmup at ``eta*_i``, Adam-preconditioned like the scheduler's gauge) should be
roughly constant; its geometric mean calibrates ``kappa``, and on the target ``eta_curv = kappa / lambda``
with ``lambda`` measured after warmup. The seed's combined peak is ``max(eta_pred, eta_curv)`` with
``eta_pred`` from the fitted power law. Pure functions (no torch); the scheduler applies them through
``online.kappa`` (:mod:`lrscale_megatron.adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KappaFit:
    """``kappa`` (geometric mean of ``eta*_i * lambda_i``), the ladder's spread (max / min of the products)
    and the number of proxies."""

    kappa: float
    spread: float
    n: int


def calibrate_kappa(ladder: Sequence[tuple[float, float]]) -> KappaFit:
    """``ladder`` = ``[(lambda_i, eta*_i), ...]``: each proxy's lambda after warmup at its optimal LR.

    Raises ``ValueError`` naming the entry when a value is missing, non-finite or not positive.
    """
    if not ladder:
        raise ValueError("calibrate_kappa: empty ladder. Fix: give at least one (lambda, eta*) pair")
    products = []
    for i, (lam, eta) in enumerate(ladder):
        for name, v in (("lambda", lam), ("eta*", eta)):
            if v is None or not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"calibrate_kappa: ladder[{i}] {name}={v!r} must be a finite number > 0. Fix: measure "
                    "lambda after warmup at the proxy's optimal LR (a converged estimate)"
                )
        products.append(lam * eta)
    logs = [math.log(p) for p in products]
    return KappaFit(math.exp(sum(logs) / len(logs)), max(products) / min(products), len(products))


def curvature_peak(kappa: float, lam: float) -> float:
    """``kappa / lam``; ``ValueError`` for a non-positive or non-finite input (never a silent number)."""
    if not (math.isfinite(kappa) and kappa > 0 and math.isfinite(lam) and lam > 0):
        raise ValueError(f"curvature_peak: kappa={kappa!r}, lambda={lam!r}: both must be finite and > 0")
    return kappa / lam


def combined_peak(eta_pred: float, eta_curv: float) -> float:
    """The seed's combined peak ``max(eta_pred, eta_curv)``."""
    return max(eta_pred, eta_curv)
