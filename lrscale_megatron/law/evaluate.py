"""Does a predicted LR train well? Regret on held-out LR sweeps.

For a group (one LR sweep) and a predicted LR, the *regret* is the relative excess of the smoothed
loss at the grid LR nearest the prediction (in log LR) over the best loss of the group:
``100 * (loss(nearest) - min loss) / min loss`` percent. It measures what a user of the prediction
would lose, in the loss that matters, instead of the distance in log LR.

:func:`leave_one_nd_out` holds out every (params, tokens) group in turn (all its batch sizes), fits
the law on the optima of the others and scores the held-out sweeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrscale_megatron.law.fit import FitConfig, fit_power_law, optima_columns
from lrscale_megatron.law.lawfile import ScalingLaw
from lrscale_megatron.law.optimum import Curve, GroupKey, extract_optima

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRegret:
    """Regret of one predicted LR on one sweep."""

    key: GroupKey
    predicted_lr: float
    chosen_lr: float
    best_lr: float
    regret_pct: float
    on_edge: bool


@dataclass(frozen=True)
class RegretSummary:
    """Regret statistics over held-out sweeps (percent)."""

    name: str
    n: int
    mean: float
    median: float
    p90: float
    max: float
    mae_log_lr: float

    @classmethod
    def of(cls, name: str, rows: Sequence[GroupRegret]) -> RegretSummary:
        """Summary of ``rows``; ``mae_log_lr`` is the mean |log(predicted / grid argmin LR)|."""
        r = np.array([g.regret_pct for g in rows])
        err = np.array([abs(np.log(g.predicted_lr / g.best_lr)) for g in rows])
        return cls(
            name,
            r.size,
            float(r.mean()),
            float(np.median(r)),
            float(np.percentile(r, 90)),
            float(r.max()),
            float(err.mean()),
        )


def regret_at(curve: Curve, lr: float) -> GroupRegret:
    """Regret of using ``lr`` (snapped to the nearest grid LR in log space) on ``curve``."""
    x = np.log(np.asarray(curve.lr))
    y = np.asarray(curve.loss)
    j = int(np.argmin(np.abs(x - np.log(lr))))
    best = float(y.min())
    i = int(np.argmin(y))
    regret = 100.0 * (float(y[j]) - best) / best
    return GroupRegret(
        curve.key, float(lr), float(curve.lr[j]), float(curve.lr[i]), regret, i in (0, y.size - 1)
    )


def evaluate_fn(curves: Sequence[Curve], lr_fn: Callable[[GroupKey], float]) -> list[GroupRegret]:
    """Regret of ``lr_fn(key)`` on every curve."""
    return [regret_at(c, lr_fn(c.key)) for c in curves]


def law_lr_fn(law: ScalingLaw) -> Callable[[GroupKey], float]:
    """A law as a function of a group key (predictors read from the key)."""

    def fn(key: GroupKey) -> float:
        return float(law.coefficient * np.prod([key.column(p) ** law.exponents[p] for p in law.predictors]))

    return fn


def leave_one_nd_out(
    curves: Sequence[Curve], method: str, config: FitConfig, min_lr_points: int = 3
) -> list[GroupRegret]:
    """Hold out each (params, tokens) group; fit on the optima of the rest; score the held-out sweeps.

    No bootstrap or CV runs inside (``config.folds``/``config.bootstrap`` are ignored); collinearity
    is not re-checked per fold.
    """
    cfg = FitConfig(
        config.predictors,
        folds=0,
        bootstrap=0,
        seed=config.seed,
        huber_epsilon=config.huber_epsilon,
        regressor=config.regressor,
    )
    usable = [c for c in curves if len(c.lr) >= min_lr_points]
    all_optima = extract_optima(list(usable), method, min_lr_points)
    nds = sorted({(c.key.params, c.key.tokens) for c in usable})
    out: list[GroupRegret] = []
    for nd in nds:
        train = [o for o in all_optima if (o.key.params, o.key.tokens) != nd]
        fit = fit_power_law(optima_columns(train), np.array([o.eta_star for o in train]), cfg, check=False)
        held = [c for c in usable if (c.key.params, c.key.tokens) == nd]
        for c in held:
            lr = float(fit.predict({p: np.array([c.key.column(p)]) for p in cfg.predictors})[0])
            out.append(regret_at(c, lr))
    return out
