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

from lrscale_megatron.law.fit import REGRESSORS, FitConfig, fit_power_law, optima_columns
from lrscale_megatron.law.lawfile import ScalingLaw
from lrscale_megatron.law.optimum import METHODS, Curve, GroupKey, Optimum, extract_optima

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


def _fold_config(config: FitConfig, regressor: str | None = None) -> FitConfig:
    return FitConfig(
        config.predictors,
        folds=0,
        bootstrap=0,
        seed=config.seed,
        huber_epsilon=config.huber_epsilon,
        regressor=regressor or config.regressor,
    )


def _nd(key: GroupKey) -> tuple[float, float]:
    return (key.params, key.tokens)


def _fit_and_score(train: Sequence[Optimum], held: Sequence[Curve], cfg: FitConfig) -> list[GroupRegret]:
    """Fit ``cfg`` on the ``train`` optima; regret of its prediction on each ``held`` curve."""
    fit = fit_power_law(optima_columns(train), np.array([o.eta_star for o in train]), cfg, check=False)
    return [
        regret_at(c, float(fit.predict({p: np.array([c.key.column(p)]) for p in cfg.predictors})[0]))
        for c in held
    ]


def _lono(curves: Sequence[Curve], optima: Sequence[Optimum], cfg: FitConfig) -> list[GroupRegret]:
    out: list[GroupRegret] = []
    for nd in sorted({_nd(c.key) for c in curves}):
        train = [o for o in optima if _nd(o.key) != nd]
        out += _fit_and_score(train, [c for c in curves if _nd(c.key) == nd], cfg)
    return out


def leave_one_nd_out(
    curves: Sequence[Curve], method: str, config: FitConfig, min_lr_points: int = 3
) -> list[GroupRegret]:
    """Hold out each (params, tokens) group; fit on the optima of the rest; score the held-out sweeps.

    No bootstrap or CV runs inside (``config.folds``/``config.bootstrap`` are ignored); collinearity
    is not re-checked per fold.
    """
    usable = [c for c in curves if len(c.lr) >= min_lr_points]
    return _lono(usable, extract_optima(list(usable), method, min_lr_points), _fold_config(config))


@dataclass(frozen=True)
class Selection:
    """The (extraction method, regressor) pair with the lowest leave-one-(N, D)-out mean regret."""

    method: str
    regressor: str
    scores: dict[tuple[str, str], float]


CANDIDATES: tuple[tuple[str, str], ...] = tuple((m, r) for m in METHODS for r in REGRESSORS)


def select_by_regret(
    curves: Sequence[Curve],
    config: FitConfig,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    min_lr_points: int = 3,
) -> Selection:
    """Pick the (method, regressor) whose leave-one-(N, D)-out mean regret on ``curves`` is lowest.

    Model selection by cross-validation of the quantity a user cares about (regret), on the data at
    hand only: :func:`nested_leave_one_nd_out` scores this whole procedure on groups it never saw.
    Ties go to the earlier candidate.
    """
    usable = [c for c in curves if len(c.lr) >= min_lr_points]
    if len({_nd(c.key) for c in usable}) < 3:
        raise ValueError(
            f"select_by_regret: {len({_nd(c.key) for c in usable})} (params, tokens) groups; "
            "fix: need >= 3 to cross-validate, or name the method and regressor"
        )
    cache: dict[str, list[Optimum]] = {}
    scores: dict[tuple[str, str], float] = {}
    for method, reg in candidates:
        if method not in cache:
            cache[method] = extract_optima(list(usable), method, min_lr_points)
        rows = _lono(usable, cache[method], _fold_config(config, reg))
        scores[(method, reg)] = float(np.mean([g.regret_pct for g in rows]))
    best = min(scores, key=lambda k: scores[k])
    return Selection(best[0], best[1], scores)


def nested_leave_one_nd_out(
    curves: Sequence[Curve],
    config: FitConfig,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    min_lr_points: int = 3,
) -> tuple[list[GroupRegret], list[Selection]]:
    """Leave-one-(N, D)-out regret of *selecting* the method by :func:`select_by_regret`.

    For each held-out (params, tokens) group, the selection runs on the other groups only (an inner
    leave-one-out), the chosen law is fitted on them and scored on the held-out sweeps: an unbiased
    estimate of the procedure's regret, with no choice made on the test groups. Returns the regrets and
    the selection made in each outer fold.
    """
    usable = [c for c in curves if len(c.lr) >= min_lr_points]
    out: list[GroupRegret] = []
    picks: list[Selection] = []
    for nd in sorted({_nd(c.key) for c in usable}):
        train_curves = [c for c in usable if _nd(c.key) != nd]
        sel = select_by_regret(train_curves, config, candidates, min_lr_points)
        picks.append(sel)
        train = extract_optima(train_curves, sel.method, min_lr_points)
        held = [c for c in usable if _nd(c.key) == nd]
        out += _fit_and_score(train, held, _fold_config(config, sel.regressor))
        logger.info("nested LONO: held out %s, selected %s + %s", nd, sel.method, sel.regressor)
    return out, picks
