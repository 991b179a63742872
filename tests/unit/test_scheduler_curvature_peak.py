"""The curvature predictor kappa / lambda: calibration on a ladder, and its refusals."""

from __future__ import annotations

import math

import pytest

from lrscale_megatron.curvature_peak import calibrate_kappa, combined_peak, curvature_peak


def test_kappa_is_the_geometric_mean_of_the_products():
    fit = calibrate_kappa([(100.0, 2e-3), (50.0, 8e-3)])  # products 0.2 and 0.4
    assert (
        fit.kappa == pytest.approx(math.sqrt(0.2 * 0.4)) and fit.spread == pytest.approx(2.0) and fit.n == 2
    )
    # an exact ladder (eta* = k / lambda) recovers k and predicts a new model exactly
    k = 0.37
    fit = calibrate_kappa([(lam, k / lam) for lam in (10.0, 40.0, 160.0)])
    assert fit.kappa == pytest.approx(k) and fit.spread == pytest.approx(1.0)
    assert curvature_peak(fit.kappa, 80.0) == pytest.approx(k / 80.0)
    assert combined_peak(1e-3, 2e-3) == 2e-3 and combined_peak(3e-3, 2e-3) == 3e-3


@pytest.mark.parametrize("bad", [[], [(float("nan"), 1e-3)], [(10.0, 0.0)], [(None, 1e-3)], [(-1.0, 1e-3)]])
def test_bad_ladders_are_refused(bad):
    with pytest.raises(ValueError, match="calibrate_kappa"):
        calibrate_kappa(bad)


def test_bad_curvature_peak_inputs_are_refused():
    for kappa, lam in ((0.1, 0.0), (0.1, float("nan")), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="curvature_peak"):
            curvature_peak(kappa, lam)
