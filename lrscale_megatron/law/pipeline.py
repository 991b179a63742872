"""Run table -> optima -> power-law fit -> :class:`ScalingLaw` (what ``lrscale fit`` does)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrscale_megatron.law.data import RunTable
from lrscale_megatron.law.fit import FitConfig, PowerLawFit, _fit_once, fit_power_law, optima_columns
from lrscale_megatron.law.lawfile import PowerLaw, ScalingLaw
from lrscale_megatron.law.optimum import Curve, Optimum, extract_optima, group_curves

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedLaw:
    """Everything ``lrscale fit`` produced: the law and the intermediate results behind it."""

    law: ScalingLaw
    fit: PowerLawFit
    optima: list[Optimum]
    curves: list[Curve]


def nd_groups(optima: Sequence[Optimum]) -> list[tuple[float, float]]:
    """(params, tokens) label of each optimum: the unit of grouped CV."""
    return [(o.key.params, o.key.tokens) for o in optima]


def fit_batch_law(curves: Sequence[Curve], epsilon: float = 1.35) -> PowerLaw | None:
    """Optimal batch tokens vs training tokens: per (params, tokens) the batch of the lowest loss.

    ``None`` when fewer than 3 (params, tokens) groups have at least 2 batch sizes each.
    """
    best: dict[tuple[float, float], tuple[float, float, int]] = {}
    n_batches: dict[tuple[float, float], int] = defaultdict(int)
    for c in curves:
        k = (c.key.params, c.key.tokens)
        n_batches[k] += 1
        m = min(c.loss)
        if k not in best or m < best[k][0]:
            best[k] = (m, c.key.batch_tokens, 0)
    keys = [k for k in best if n_batches[k] >= 2]
    if len({k[1] for k in keys}) < 3:
        return None
    log_d = np.log([[k[1]] for k in keys])
    log_b = np.log([best[k][1] for k in keys])
    beta = _fit_once(log_d, log_b, "huber", epsilon)
    return PowerLaw(float(np.exp(beta[0])), {"tokens": float(beta[1])})


def fit_law(
    table: RunTable,
    config: FitConfig,
    name: str,
    provenance: dict[str, Any],
    method: str = "parabola",
    check: bool = True,
) -> FittedLaw:
    """Extract optima with ``method``, fit ``config.predictors`` with grouped CV, and build the law."""
    curves = group_curves(table)
    optima = extract_optima(curves, method)
    cols = optima_columns(optima)
    eta = np.array([o.eta_star for o in optima])
    fit = fit_power_law(cols, eta, config, groups=nd_groups(optima), check=check)
    batch_law = fit_batch_law(curves, config.huber_epsilon)
    law = ScalingLaw(
        name=name,
        predictors=fit.predictors,
        coefficient=float(np.exp(fit.log_c)),
        exponents=dict(fit.exponents),
        provenance={
            **provenance,
            "n_runs": len(table),
            "n_groups": len(curves),
            "n_optima": len(optima),
            "regressor": fit.regressor,
            "bootstrap": int(fit.bootstrap.shape[0]),
            "bootstrap_unit": "(params, tokens) group" if fit.bootstrap_unit == "group" else "point",
            "huber_convergence_warnings": dict(fit.convergence_warnings),
            "loss": table.loss_kind,
            "n_diverged_runs": int(np.sum(np.isinf(table.loss))),
            "seed": config.seed,
        },
        ci_level=fit.ci_level,
        exponent_ci={p: fit.ci[p] for p in fit.predictors},
        coefficient_ci=(float(np.exp(fit.ci["log_c"][0])), float(np.exp(fit.ci["log_c"][1]))),
        fitted_ranges=dict(fit.ranges),
        cv=(
            {"folds": fit.cv.folds, "grouped": fit.cv.grouped, "r2": fit.cv.r2, "mae_log": fit.cv.mae_log}
            if fit.cv
            else None
        ),
        bootstrap_log_c=tuple(float(v) for v in fit.bootstrap[:, 0]),
        bootstrap_exponents={
            p: tuple(float(v) for v in fit.bootstrap[:, j + 1]) for j, p in enumerate(fit.predictors)
        },
        batch_law=batch_law,
        optimum_method=method,
        collinearity=fit.collinearity.to_dict(),
    )
    return FittedLaw(law, fit, optima, curves)
