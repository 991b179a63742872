"""Model selection by leave-one-(N, D)-out regret on synthetic LR sweeps from a known law."""

from __future__ import annotations

import numpy as np
import pytest

import lrscale_megatron.law.evaluate as ev
from lrscale_megatron.law.fit import FitConfig
from lrscale_megatron.law.optimum import Curve, GroupKey

PRED = ("params", "tokens", "batch")


def _eta(n, d, b):
    return 0.5 * n**-0.5 * d**0.05 * b**0.3


def _curves(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    grid = 2.0 ** np.arange(-16, -4, 0.5)
    for n in (1e6, 4e6, 1.6e7):
        for d in (1e8, 4e8):
            for b in (1e4, 4e4, 1.6e5):
                x = np.log(grid / _eta(n, d, b))
                loss = 3.0 * (1 + 0.01 * x**2) + noise * rng.standard_normal(grid.size)
                out.append(Curve(GroupKey(n, d, b, 0.0, 0.0), tuple(grid), tuple(loss)))
    return out


def test_noiseless_selection_has_near_zero_regret():
    sel = ev.select_by_regret(_curves(), FitConfig(PRED))
    assert set(sel.scores) == set(ev.CANDIDATES)
    assert sel.scores[(sel.method, sel.regressor)] == min(sel.scores.values())
    assert sel.scores[(sel.method, sel.regressor)] < 0.05  # snapped to the nearest of sqrt(2) steps
    rows, picks = ev.nested_leave_one_nd_out(_curves(), FitConfig(PRED))
    assert len(rows) == 18 and len(picks) == 6
    assert np.mean([r.regret_pct for r in rows]) < 0.05


def test_selection_never_sees_the_held_out_group(monkeypatch):
    seen = []
    real = ev.select_by_regret

    def spy(curves, config, candidates=ev.CANDIDATES, min_lr_points=3):
        seen.append({(c.key.params, c.key.tokens) for c in curves})
        return real(curves, config, candidates, min_lr_points)

    monkeypatch.setattr(ev, "select_by_regret", spy)
    ev.nested_leave_one_nd_out(_curves(noise=0.003), FitConfig(PRED), candidates=(("argmin", "huber"),))
    all_nd = {(n, d) for n in (1e6, 4e6, 1.6e7) for d in (1e8, 4e8)}
    assert len(seen) == 6
    for s in seen:
        assert len(s) == 5 and s < all_nd  # exactly one group held out each time
    assert set().union(*[all_nd - s for s in seen]) == all_nd


def test_selection_needs_three_groups():
    few = [c for c in _curves() if c.key.params == 1e6]  # 2 (N, D) groups
    with pytest.raises(ValueError, match=r"2 \(params, tokens\) groups"):
        ev.select_by_regret(few, FitConfig(PRED))
