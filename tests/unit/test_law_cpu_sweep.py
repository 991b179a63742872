"""The shipped cpu-sweep law against the committed CPU sweep store (real megatron-core GPT runs).

Checks that the law file is exactly what its recorded command produces from the data in
``data/sweeps/cpu-sweep.sqlite`` (nothing hand-edited), and that the law-selection procedure beats
the obvious alternative, one constant LR, on (N, D) groups it did not see. The CV R² target of the
issue (0.95) is not met on this sweep; docs/scaling-law.md reports why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrscale_megatron.law.data import load_store
from lrscale_megatron.law.evaluate import RegretSummary, nested_leave_one_nd_out, regret_at
from lrscale_megatron.law.fit import FitConfig
from lrscale_megatron.law.lawfile import load_law
from lrscale_megatron.law.optimum import extract_optima, group_curves
from lrscale_megatron.law.pipeline import fit_law

DB = Path(__file__).resolve().parents[2] / "data" / "sweeps" / "cpu-sweep.sqlite"


@pytest.fixture(scope="module")
def table():
    return load_store(DB, "val")


def test_shipped_law_refits_from_the_store(table):
    law = load_law("cpu-sweep")
    prov = law.provenance
    cfg = FitConfig(law.predictors, folds=5, bootstrap=0, seed=prov["seed"], regressor=prov["regressor"])
    prov0 = {"data": str(DB), "date": "test", "command": "test"}
    fitted = fit_law(table, cfg, "refit", prov0, method=law.optimum_method)
    assert prov["n_runs"] == len(table) and prov["n_optima"] == len(fitted.optima)
    assert fitted.law.coefficient == pytest.approx(law.coefficient, rel=1e-9)
    for p in law.predictors:
        assert fitted.law.exponents[p] == pytest.approx(law.exponents[p], abs=1e-9)
    assert fitted.fit.cv is not None and fitted.fit.cv.r2 == pytest.approx(law.cv["r2"], abs=1e-9)
    assert law.cv["r2"] > 0.3  # the measured 0.428; explains a real part of eta*'s variance


def test_selected_law_beats_a_constant_lr_on_held_out_groups(table):
    curves = group_curves(table)
    law_rows, _ = nested_leave_one_nd_out(curves, FitConfig(("width", "depth", "tokens", "batch")))
    optima = extract_optima(curves, "argmin")
    const_rows = []
    for nd in sorted({(c.key.params, c.key.tokens) for c in curves}):
        train = [o.eta_star for o in optima if (o.key.params, o.key.tokens) != nd]
        lr = float(np.exp(np.mean(np.log(train))))  # the best single LR for the training groups
        const_rows += [regret_at(c, lr) for c in curves if (c.key.params, c.key.tokens) == nd]
    law_s, const_s = RegretSummary.of("law", law_rows), RegretSummary.of("constant", const_rows)
    assert law_s.n == const_s.n == 24
    assert law_s.mean < 0.75 * const_s.mean  # measured 1.94 % vs 4.11 %
