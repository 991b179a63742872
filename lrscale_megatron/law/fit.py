"""Log-linear power law ``eta* = c * prod_j x_j ** e_j`` fitted with Huber regression.

In log space ``log eta* = log c + sum_j e_j log x_j``. The fit uses scikit-learn's
``HuberRegressor`` (Huber 1964; Owen 2007 joint scale estimation) so that a few mis-located optima
(noisy curves, a diverged run) do not drag the exponents; ``regressor="ols"`` is kept for comparison.

Around the point fit:

1. k-fold cross-validation (grouped when groups are given) -> pooled R^2 and MAE of log eta*;
2. bootstrap (Efron 1979) over whole groups when groups are given, like the grouped CV (a cluster
   bootstrap: optima of one (params, tokens) share their runs' noise, so resampling single points
   makes the intervals too narrow), else over points -> percentile CIs for every exponent and the
   coefficient, and the samples that ``predict`` propagates into an LR interval
   (:mod:`lrscale_megatron.law.bootstrap`);
3. a collinearity check of the centred log design (condition number, Belsley et al. 1980; variance
   inflation factors; rank): predictors the data cannot separate (e.g. width and depth that move
   together, as in the Step Law runs) are refused with :class:`CollinearityError`.

Predictors are named columns; besides the standard ones (``width``, ``depth``, ``params``, ``tokens``,
``batch``) any extra positive column can be passed (the hook for a curvature predictor such as
``kappa / lambda_max``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import HuberRegressor, LinearRegression
from sklearn.model_selection import GroupKFold, KFold

from lrscale_megatron.law.collinearity import (  # noqa: F401  (re-exported: the fit's public API)
    CollinearityError,
    CollinearityReport,
    _finite_or_none,
    _log_design,
    check_collinearity,
)
from lrscale_megatron.law.optimum import Optimum

logger = logging.getLogger(__name__)

REGRESSORS = ("huber", "ols")


@dataclass(frozen=True)
class FitConfig:
    """How to fit a power law.

    Attributes:
        predictors: column names, e.g. ``("params", "tokens", "batch")``; order is kept in outputs.
        folds: k of k-fold CV (0 = no CV).
        bootstrap: bootstrap resamples for CIs and prediction intervals (0 = none).
        seed: seed for CV shuffling and bootstrap resampling.
        huber_epsilon: Huber threshold in units of the estimated residual scale (1.35 = 95 % Gaussian efficiency).
        ci_level: two-sided level of the reported exponent CIs.
        max_condition: largest condition number of the column-normalised centred log design accepted.
        max_vif: largest variance inflation factor accepted (5: the stricter of the usual 5 / 10 rules of
            thumb, James et al. 2013 ISLR sec. 3.3.3; width/depth in the Step Law runs have VIF 6.4).
        regressor: ``"huber"`` or ``"ols"``.
    """

    predictors: tuple[str, ...]
    folds: int = 5
    bootstrap: int = 200
    seed: int = 0
    huber_epsilon: float = 1.35
    ci_level: float = 0.95
    max_condition: float = 30.0
    max_vif: float = 5.0
    regressor: str = "huber"

    def __post_init__(self) -> None:
        object.__setattr__(self, "predictors", tuple(self.predictors))
        if not self.predictors:
            raise ValueError(
                "FitConfig.predictors=(); fix: name at least one predictor, e.g. ('params', 'tokens')"
            )
        if len(set(self.predictors)) != len(self.predictors):
            raise ValueError(
                f"FitConfig.predictors={self.predictors} has duplicates; fix: name each predictor once"
            )
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"FitConfig.folds={self.folds}; fix: use 0 (no CV) or k >= 2")
        if self.bootstrap < 0:
            raise ValueError(f"FitConfig.bootstrap={self.bootstrap}; fix: use 0 (none) or a positive count")
        if not self.huber_epsilon > 1.0:
            raise ValueError(
                f"FitConfig.huber_epsilon={self.huber_epsilon}; fix: must be > 1 (1.35 is standard)"
            )
        if not 0.0 < self.ci_level < 1.0:
            raise ValueError(f"FitConfig.ci_level={self.ci_level}; fix: use a level in (0, 1), e.g. 0.95")
        if self.regressor not in REGRESSORS:
            raise ValueError(f"FitConfig.regressor={self.regressor!r}; fix: use one of {REGRESSORS}")


@dataclass(frozen=True)
class CVMetrics:
    """Cross-validated accuracy of log eta* (pooled out-of-fold predictions)."""

    folds: int
    grouped: bool
    r2: float
    mae_log: float


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted power law with its uncertainty.

    Attributes:
        predictors: column names, in coefficient order.
        log_c: natural log of the coefficient c.
        exponents: exponent per predictor (signed: eta* ~ x ** e).
        ci: (lo, hi) per predictor and for ``"log_c"``, at ``ci_level``.
        ci_level: two-sided level of ``ci``.
        bootstrap: array (B, 1 + p): log_c then exponents, one row per resample (B may be 0).
        cv: cross-validation metrics, ``None`` when folds = 0.
        collinearity: the separability report of the design.
        ranges: (min, max) of each predictor over the fitted points.
        n_points: number of fitted optima.
        regressor: ``"huber"`` or ``"ols"``.
        bootstrap_unit: ``"group"`` (whole groups resampled) or ``"point"``.
        convergence_warnings: Huber fits that hit ``max_iter`` without converging, per stage
            (``point``, ``bootstrap``, ``cv``); logged, and recorded in a law's provenance.
    """

    predictors: tuple[str, ...]
    log_c: float
    exponents: dict[str, float]
    ci: dict[str, tuple[float, float]]
    ci_level: float
    bootstrap: np.ndarray
    cv: CVMetrics | None
    collinearity: CollinearityReport
    ranges: dict[str, tuple[float, float]]
    n_points: int
    regressor: str
    bootstrap_unit: str = "point"
    convergence_warnings: dict[str, int] = field(default_factory=dict)

    def predict(self, columns: Mapping[str, np.ndarray | float]) -> np.ndarray:
        """eta* at the given predictor values."""
        log_x = _log_design(columns, self.predictors)
        return np.exp(self.log_c + log_x @ np.array([self.exponents[p] for p in self.predictors]))


def optima_columns(
    optima: Sequence[Optimum], extra: Mapping[str, Sequence[float]] | None = None
) -> dict[str, np.ndarray]:
    """Predictor columns of a list of optima; ``extra`` adds named columns (one value per optimum)."""
    cols = {
        p: np.array([o.key.column(p) for o in optima], dtype=float)
        for p in ("width", "depth", "params", "tokens", "batch")
    }
    for name, values in (extra or {}).items():
        arr = np.asarray(values, dtype=float)
        if arr.shape != (len(optima),):
            raise ValueError(
                f"extra column {name!r} has shape {arr.shape}; fix: give one value per optimum ({len(optima)})"
            )
        cols[name] = arr
    return cols


def _fit_once(
    log_x: np.ndarray, y: np.ndarray, regressor: str, epsilon: float, notes: list[str] | None = None
) -> np.ndarray:
    """[log_c, e_1, ..., e_p] from one regression on centred log predictors.

    A Huber fit that does not converge is not silenced: its warning text is appended to ``notes``
    (the caller counts, logs and records them), or logged here when ``notes`` is ``None``.
    """
    mean = log_x.mean(axis=0)
    xc = log_x - mean
    if regressor == "huber":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = HuberRegressor(epsilon=epsilon, alpha=0.0, max_iter=1000).fit(xc, y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                if notes is None:
                    logger.warning("Huber fit did not converge: %s", w.message)
                else:
                    notes.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
        model = LinearRegression().fit(xc, y)
    coef = np.asarray(model.coef_, dtype=float)
    return np.concatenate([[float(model.intercept_) - float(mean @ coef)], coef])


def cross_validate(
    log_x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    groups: Sequence[object] | None = None,
    notes: list[str] | None = None,
) -> CVMetrics | None:
    """Pooled out-of-fold R^2 and MAE of log eta*; grouped folds when ``groups`` has >= folds groups."""
    n = y.size
    if config.folds == 0:
        return None
    if config.folds > n:
        raise ValueError(f"FitConfig.folds={config.folds} > {n} points; fix: use at most {n} folds")
    grouped = groups is not None and len(set(groups)) >= config.folds
    if grouped:
        codes = np.unique(np.asarray([str(g) for g in groups or []]), return_inverse=True)[1]
        splits = GroupKFold(n_splits=config.folds).split(log_x, y, codes)
    else:
        splits = KFold(n_splits=config.folds, shuffle=True, random_state=config.seed).split(log_x)
    pred = np.empty(n)
    for train, test in splits:
        beta = _fit_once(log_x[train], y[train], config.regressor, config.huber_epsilon, notes)
        pred[test] = beta[0] + log_x[test] @ beta[1:]
    resid = y - pred
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    return CVMetrics(config.folds, grouped, r2, float(np.mean(np.abs(resid))))


def fit_power_law(
    columns: Mapping[str, np.ndarray],
    eta: np.ndarray,
    config: FitConfig,
    groups: Sequence[object] | None = None,
    check: bool = True,
) -> PowerLawFit:
    """Fit ``eta = c * prod x_p ** e_p`` over ``config.predictors``.

    Raises :class:`CollinearityError` when ``check`` and the design cannot separate the predictors.
    ``groups`` (one label per point, e.g. the (params, tokens) of each optimum) makes CV folds grouped.
    """
    y_raw = np.asarray(eta, dtype=float).reshape(-1)
    if not np.all(np.isfinite(y_raw) & (y_raw > 0)):
        raise ValueError("eta has non-positive or non-finite values; fix: pass measured optimal LRs > 0")
    log_x = _log_design(columns, config.predictors)
    if log_x.shape[0] != y_raw.size:
        raise ValueError(
            f"eta has {y_raw.size} values but predictors have {log_x.shape[0]}; fix: one row per optimum"
        )
    p = len(config.predictors)
    if y_raw.size < p + 2:
        raise ValueError(f"{y_raw.size} optima for {p} predictors; fix: need at least {p + 2} optima")
    y = np.log(y_raw)
    report = check_collinearity(columns, config.predictors, config.max_condition, config.max_vif)
    if check and not report.separable:
        raise CollinearityError(report)
    from lrscale_megatron.law.bootstrap import bootstrap_fits

    notes: dict[str, list[str]] = {"point": [], "bootstrap": [], "cv": []}
    beta = _fit_once(log_x, y, config.regressor, config.huber_epsilon, notes["point"])
    boot, unit = bootstrap_fits(log_x, y, config, groups, notes["bootstrap"])
    tail = 100 * (1 - config.ci_level) / 2
    names = ("log_c", *config.predictors)
    if config.bootstrap:
        lo, hi = np.percentile(boot, [tail, 100 - tail], axis=0)
        ci = {n: (float(lo[j]), float(hi[j])) for j, n in enumerate(names)}
    else:
        ci = {n: (float(beta[j]), float(beta[j])) for j, n in enumerate(names)}
    cv = cross_validate(log_x, y, config, groups, notes["cv"])
    conv = {k: len(v) for k, v in notes.items() if v}
    if conv:
        logger.warning(
            "Huber regression did not converge in %s fit(s) (max_iter=1000); e.g. %s",
            ", ".join(f"{n} {k}" for k, n in conv.items()),
            next(v[0] for v in notes.values() if v),
        )
    raw = {pn: np.asarray(columns[pn], dtype=float) for pn in config.predictors}
    ranges = {pn: (float(raw[pn].min()), float(raw[pn].max())) for pn in config.predictors}
    fit = PowerLawFit(
        predictors=config.predictors,
        log_c=float(beta[0]),
        exponents={pn: float(beta[j + 1]) for j, pn in enumerate(config.predictors)},
        ci=ci,
        ci_level=config.ci_level,
        bootstrap=boot,
        cv=cv,
        collinearity=report,
        ranges=ranges,
        n_points=int(y.size),
        regressor=config.regressor,
        bootstrap_unit=unit,
        convergence_warnings=conv,
    )
    logger.info(
        "fitted %s law on %d optima: c=%.4g, %s; CV R2=%s",
        config.regressor,
        fit.n_points,
        np.exp(fit.log_c),
        ", ".join(f"{k}^{v:+.3f}" for k, v in fit.exponents.items()),
        f"{cv.r2:.3f}" if cv else "n/a",
    )
    return fit


@dataclass(frozen=True)
class AblationRow:
    """CV accuracy with one predictor dropped (``dropped=None``: the full set)."""

    dropped: str | None
    predictors: tuple[str, ...]
    r2: float
    mae_log: float
    delta_r2: float


def ablation(
    columns: Mapping[str, np.ndarray],
    eta: np.ndarray,
    config: FitConfig,
    groups: Sequence[object] | None = None,
) -> list[AblationRow]:
    """Drop-one-predictor table: CV R^2 / MAE of the full set and of each set with one predictor removed."""
    if config.folds == 0:
        raise ValueError("ablation needs cross-validation; fix: set FitConfig.folds >= 2")
    y = np.log(np.asarray(eta, dtype=float))
    sets: list[tuple[str | None, tuple[str, ...]]] = [(None, config.predictors)]
    if len(config.predictors) > 1:
        sets += [(d, tuple(p for p in config.predictors if p != d)) for d in config.predictors]
    rows: list[AblationRow] = []
    base_r2 = float("nan")
    for dropped, preds in sets:
        cv = cross_validate(_log_design(columns, preds), y, config, groups)
        assert cv is not None  # folds >= 2 checked above
        if dropped is None:
            base_r2 = cv.r2
        rows.append(AblationRow(dropped, preds, cv.r2, cv.mae_log, cv.r2 - base_r2))
    return rows
