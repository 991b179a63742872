"""eta* extraction: sub-grid parabola, edge flagging, duplicate merge."""

from __future__ import annotations

import numpy as np
import pytest

from lrscale_megatron.law.data import RunTable
from lrscale_megatron.law.optimum import Curve, GroupKey, extract_optima, group_curves, optimum_of_curve

KEY = GroupKey(1e8, 1e10, 1e6, 512, 8)


def _curve(lrs, true_eta):
    loss = 2 + 0.05 * np.log(np.asarray(lrs) / true_eta) ** 2
    return Curve(KEY, tuple(lrs), tuple(loss))


def test_parabola_recovers_subgrid_optimum():
    lrs = 1e-3 * 2.0 ** np.arange(-4, 5)
    c = _curve(lrs, 1.3e-3)
    assert optimum_of_curve(c, "parabola").eta_star == pytest.approx(1.3e-3, rel=1e-6)
    assert optimum_of_curve(c, "lsq5").eta_star == pytest.approx(1.3e-3, rel=1e-6)
    am = optimum_of_curve(c, "argmin")
    assert am.eta_star == pytest.approx(1e-3) and am.bracket == pytest.approx((5e-4, 2e-3))


def test_edge_minimum_flagged_and_left_out():
    lrs = 1e-3 * 2.0 ** np.arange(0, 6)
    c = _curve(lrs, 1e-4)  # optimum below the grid
    assert optimum_of_curve(c).on_edge
    assert extract_optima([c]) == []
    assert len(extract_optima([c], keep_edge=True)) == 1


def test_group_curves_merges_duplicate_lrs():
    t = RunTable(
        width=np.full(4, 512.0),
        depth=np.full(4, 8.0),
        params=np.full(4, 1e8),
        tokens=np.full(4, 1e10),
        batch_tokens=np.full(4, 1e6),
        lr=np.array([3.453e-4, 3.45e-4, 1e-3, 3e-3]),
        loss=np.array([2.0, 2.2, 1.9, 2.3]),
    )
    (c,) = group_curves(t)
    assert len(c.lr) == 3 and c.loss[0] == pytest.approx(2.1)
