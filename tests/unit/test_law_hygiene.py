"""Law hygiene: bootstrap over whole groups, Huber convergence warnings surfaced, train and validation
losses never mixed, diverged runs kept as a loss above any finite one (not dropped)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sklearn.linear_model import HuberRegressor

import lrscale_megatron.law.fit as fit_mod
from lrscale_megatron.law.data import DataError, RunTable, load_store
from lrscale_megatron.law.fit import FitConfig, fit_power_law
from lrscale_megatron.law.optimum import extract_optima, group_curves
from lrscale_megatron.law.pipeline import fit_law
from lrscale_megatron.sweep.runner import DivergedError, RunResult, SweepGrid, run_sweep
from lrscale_megatron.sweep.store import SweepStore


def _grouped_data(seed: int = 0):
    """6 groups of 4 optima each; the noise is shared within a group (as for one (N, D) swept at 4 batches)."""
    rng = np.random.default_rng(seed)
    params = np.repeat(np.geomspace(1e5, 1e8, 6), 4)
    group_noise = np.repeat(rng.normal(0, 0.3, 6), 4)
    eta = 0.5 * params**-0.4 * np.exp(group_noise + rng.normal(0, 0.01, params.size))
    return {"params": params}, eta, [float(p) for p in params]


def test_bootstrap_resamples_whole_groups_and_is_wider_than_the_point_bootstrap():
    cols, eta, groups = _grouped_data()
    cfg = FitConfig(("params",), folds=3, bootstrap=300, seed=0, regressor="ols")
    by_group = fit_power_law(cols, eta, cfg, groups=groups)
    by_point = fit_power_law(cols, eta, cfg)
    assert by_group.bootstrap_unit == "group" and by_point.bootstrap_unit == "point"
    w_group = np.diff(by_group.ci["params"])[0]
    w_point = np.diff(by_point.ci["params"])[0]
    # 24 points but only 6 independent groups: the honest interval is about sqrt(4) = 2x wider
    assert w_group > 1.5 * w_point
    # an OLS reference: the slope's standard error from the 6 group means
    x = np.log(np.geomspace(1e5, 1e8, 6))
    y = np.log(eta).reshape(6, 4).mean(axis=1)
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    se = math.sqrt(resid @ resid / 4 / np.sum((x - x.mean()) ** 2))
    assert 0.5 * 2 * 1.96 * se < w_group < 2.5 * 2 * 1.96 * se


def test_huber_convergence_warnings_are_logged_and_recorded(monkeypatch, caplog):
    class OneIter(HuberRegressor):
        def __init__(self, **kw):
            super().__init__(**{**kw, "max_iter": 1})

    monkeypatch.setattr(fit_mod, "HuberRegressor", OneIter)
    cols, eta, groups = _grouped_data()
    with caplog.at_level(logging.WARNING, logger="lrscale_megatron.law.fit"):
        fit = fit_power_law(cols, eta, FitConfig(("params",), folds=3, bootstrap=5), groups=groups)
    assert fit.convergence_warnings == {"point": 1, "bootstrap": 5, "cv": 3}
    assert any("did not converge" in r.message for r in caplog.records)


def _table_run(store_path, lrs, loss_of, diverge_above=math.inf, val=True):
    grid = SweepGrid(
        widths=(64,),
        depths=(2,),
        token_budgets=(1e6,),
        batch_tokens=(4096,),
        lr_min=min(lrs),
        lr_max=max(lrs),
        n_lr=len(lrs),
    )

    def train_fn(config, report):
        if config["lr"] > diverge_above:
            raise DivergedError("final train loss nan")
        report(step=1, train_loss=3.0)
        loss = loss_of(config["lr"])
        return RunResult(final_train_loss=loss - 0.1, final_val_loss=loss if val else None)

    return run_sweep(store_path, grid.expand(), train_fn, workers=1, progress=False)


def test_a_diverged_run_is_kept_and_brackets_the_optimum(tmp_path):
    db = tmp_path / "s.sqlite"
    lrs = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    # loss falls with LR up to 4e-3; above 5e-3 every run diverges: the optimum is 4e-3, not a grid edge
    summary = _table_run(db, lrs, lambda lr: 3.0 - 0.1 * math.log(lr / 1e-3), diverge_above=5e-3)
    assert summary.diverged == 2 and summary.failed == 0 and summary.finished == 3
    table = load_store(db, "val")
    assert len(table) == 5 and int(np.isinf(table.loss).sum()) == 2 and table.loss_kind == "val"
    (opt,) = extract_optima(group_curves(table), "parabola")
    assert not opt.on_edge and opt.eta_star == pytest.approx(4e-3, rel=1e-6)
    # a diverged run is a result, never retried on resume
    st = SweepStore(db)
    assert st.retry_failed() == [] and sum(r.diverged for r in st.runs()) == 2
    st.close()
    again = _table_run(db, lrs, lambda lr: 0.0, diverge_above=5e-3)
    assert again.skipped == 5 and again.finished == 3


def test_train_and_validation_losses_are_never_mixed(tmp_path):
    db = tmp_path / "s.sqlite"
    _table_run(db, [1e-3, 2e-3, 4e-3], lambda lr: 3.0, val=False)
    with pytest.raises(DataError, match=r"no final validation loss.*never mixed.*fix: use loss='train'"):
        load_store(db, "val")
    table = load_store(db, "train")
    assert table.loss_kind == "train" and np.allclose(table.loss, 2.9)


def test_fit_law_provenance_records_bootstrap_unit_loss_and_divergence():
    rng = np.random.default_rng(0)
    rows = []
    for n in np.geomspace(1e4, 1e6, 5):
        best = 0.3 * n**-0.3
        for lr in best * np.geomspace(0.25, 4, 5) * np.exp(rng.normal(0, 0.05)):
            loss = math.inf if lr > 3 * best else 2 + 0.05 * math.log(lr / best) ** 2
            rows.append((n, lr, loss))
    n_rows = len(rows)
    t = RunTable(
        width=np.full(n_rows, 64.0),
        depth=np.full(n_rows, 2.0),
        params=np.array([r[0] for r in rows]),
        tokens=np.full(n_rows, 1e6),
        batch_tokens=np.full(n_rows, 4096.0),
        lr=np.array([r[1] for r in rows]),
        loss=np.array([r[2] for r in rows]),
        loss_kind="val",
    )
    fitted = fit_law(
        t, FitConfig(("params",), folds=5, bootstrap=10), "t", {"data": "x", "date": "d", "command": "c"}
    )
    prov = fitted.law.provenance
    assert prov["bootstrap_unit"] == "(params, tokens) group" and prov["loss"] == "val"
    assert prov["n_diverged_runs"] == 5 and prov["huber_convergence_warnings"] == {}
    assert fitted.law.exponents["params"] == pytest.approx(-0.3, abs=0.05)
