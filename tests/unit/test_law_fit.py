"""Synthetic recovery, Huber vs OLS, collinearity refusal, ablation."""

from __future__ import annotations

import numpy as np
import pytest

from lrscale_megatron.law.fit import CollinearityError, FitConfig, ablation, check_collinearity, fit_power_law

TRUE = {"params": -0.7, "tokens": 0.3, "batch": 0.25}
LOG_C = np.log(1.5)


def _synthetic(n: int = 120, outliers: float = 0.05, seed: int = 1, true: dict[str, float] = TRUE):
    rng = np.random.default_rng(seed)
    cols = {
        "params": np.exp(rng.uniform(np.log(1e7), np.log(1e10), n)),
        "tokens": np.exp(rng.uniform(np.log(1e9), np.log(1e12), n)),
        "batch": np.exp(rng.uniform(np.log(6e4), np.log(8e6), n)),
    }
    log_eta = LOG_C + sum(true[p] * np.log(cols[p]) for p in true)
    log_eta = log_eta + rng.normal(0.0, 0.10, n)  # 10 % log-noise
    bad = rng.choice(n, int(round(outliers * n)), replace=False)
    log_eta[bad] += rng.choice([-1.0, 1.0], bad.size) * rng.uniform(
        1.5, 2.5, bad.size
    )  # gross outliers (x4.5..12)
    return cols, np.exp(log_eta)


def test_recovers_every_exponent_within_its_bootstrap_ci():
    cols, eta = _synthetic()
    # 99 % CIs: with three exponents, 95 % CIs would all cover the truth only ~86 % of the time.
    fit = fit_power_law(cols, eta, FitConfig(tuple(TRUE), folds=5, bootstrap=100, seed=0, ci_level=0.99))
    for p, e in TRUE.items():
        lo, hi = fit.ci[p]
        assert lo <= e <= hi, (p, e, fit.ci[p], fit.exponents[p])
        assert abs(fit.exponents[p] - e) < 0.05
    assert fit.cv is not None and fit.cv.r2 > 0.8


def test_huber_beats_ols_on_outliers():
    cols, eta = _synthetic()
    huber = fit_power_law(cols, eta, FitConfig(tuple(TRUE), folds=0, bootstrap=0))
    ols = fit_power_law(cols, eta, FitConfig(tuple(TRUE), folds=0, bootstrap=0, regressor="ols"))
    err_h = sum(abs(huber.exponents[p] - e) for p, e in TRUE.items())
    err_o = sum(abs(ols.exponents[p] - e) for p, e in TRUE.items())
    assert err_h < err_o
    assert err_h < 0.5 * err_o


def test_collinear_width_depth_refused_and_named():
    rng = np.random.default_rng(0)
    width = np.exp(rng.uniform(np.log(256), np.log(4096), 60))
    depth = width / 64 * np.exp(rng.normal(0, 0.02, 60))  # depth moves with width
    tokens = np.exp(rng.uniform(20, 25, 60))
    eta = width**-1.0 * tokens**0.1
    cols = {"width": width, "depth": depth, "tokens": tokens}
    rep = check_collinearity(cols, ("width", "depth", "tokens"))
    assert set(rep.inseparable) == {"width", "depth"}
    with pytest.raises(CollinearityError, match="width, depth cannot be separated"):
        fit_power_law(cols, eta, FitConfig(("width", "depth", "tokens"), folds=0, bootstrap=0))
    # one of them alone is fine
    fit = fit_power_law(cols, eta, FitConfig(("width", "tokens"), folds=0, bootstrap=0))
    assert fit.collinearity.separable


def test_exact_dependence_gives_infinite_vif():
    rng = np.random.default_rng(0)
    w = np.exp(rng.uniform(5, 8, 30))
    d = np.exp(rng.uniform(1, 3, 30))
    rep = check_collinearity({"width": w, "depth": d, "params": 12 * d * w**2}, ("width", "depth", "params"))
    assert rep.rank == 2 and not rep.separable
    assert all(np.isinf(v) or v > 1e6 for v in rep.vif.values())


def test_ablation_drop_batch_hurts_most():
    # batch carries most of the variance of log eta* (as in the Step Law runs, docs/scaling-law.md):
    # dropping a predictor costs R^2 ~ e^2 var(log x) / var(log eta*), a reference independent of the fit
    true = {"params": -0.3, "tokens": 0.1, "batch": 0.6}
    cols, eta = _synthetic(outliers=0.0, true=true)
    rows = ablation(cols, eta, FitConfig(tuple(true), folds=5, bootstrap=0))
    assert rows[0].dropped is None and rows[0].delta_r2 == 0.0
    assert {r.dropped for r in rows[1:]} == set(true)
    delta = {r.dropped: r.delta_r2 for r in rows[1:]}
    assert min(delta, key=lambda k: delta[k]) == "batch"
    assert delta["batch"] < delta["params"] < delta["tokens"] < 0
    y = np.log(eta)
    for p, e in true.items():
        expected = e**2 * np.var(np.log(cols[p])) / np.var(y)
        assert -delta[p] == pytest.approx(expected, rel=0.25, abs=0.01), p


def test_extra_predictor_hook():
    cols, eta = _synthetic(outliers=0.0)
    curv = np.exp(np.random.default_rng(3).normal(0, 1, eta.size))
    fit = fit_power_law(
        {**cols, "kappa_over_lambda": curv},
        eta * curv**0.5,
        FitConfig((*TRUE, "kappa_over_lambda"), folds=0, bootstrap=0),
    )
    assert abs(fit.exponents["kappa_over_lambda"] - 0.5) < 0.05


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"folds": 1}, "folds"),
        ({"ci_level": 1.5}, "ci_level"),
        ({"regressor": "lasso"}, "regressor"),
        ({"predictors": ()}, "predictors"),
    ],
)
def test_fit_config_errors_name_field(kwargs, field):
    args = {"predictors": ("params",), **kwargs}
    with pytest.raises(ValueError, match=f"FitConfig.{field}"):
        FitConfig(**args)
