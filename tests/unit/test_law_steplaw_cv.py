"""Leave-one-(N, D)-out regret on the Step Law CSV (the numbers in docs/scaling-law.md come from
benchmarks/law_steplaw_cv.py; this test only checks the machinery and that we beat the published law)."""

from __future__ import annotations

from lrscale_megatron.law.data import load_steplaw_csv
from lrscale_megatron.law.evaluate import (
    RegretSummary,
    evaluate_fn,
    law_lr_fn,
    leave_one_nd_out,
    nested_leave_one_nd_out,
)
from lrscale_megatron.law.fit import FitConfig
from lrscale_megatron.law.lawfile import load_law
from lrscale_megatron.law.optimum import group_curves
from tests.conftest import steplaw_csv

CSV = steplaw_csv()


def test_logo_regret_beats_published_steplaw():
    curves = group_curves(load_steplaw_csv(CSV))
    ours = RegretSummary.of(
        "ours", leave_one_nd_out(curves, "parabola", FitConfig(("params", "tokens", "batch")))
    )
    pub = RegretSummary.of("published", evaluate_fn(curves, law_lr_fn(load_law("steplaw-published"))))
    assert ours.n == pub.n == 150
    assert ours.mean < pub.mean
    assert 0 <= ours.median <= ours.p90 <= ours.max


def test_nested_selection_meets_target_and_beats_naive_baseline():
    """The must-show: selecting (method, regressor) by inner leave-one-out regret, scored on held-out
    (N, D) groups it never saw, has mean regret <= 0.15 % and beats argmin + Huber and Step Law."""
    curves = group_curves(load_steplaw_csv(CSV))
    cfg = FitConfig(("params", "tokens", "batch"))
    rows, picks = nested_leave_one_nd_out(curves, cfg)
    nested = RegretSummary.of("nested", rows)
    naive = RegretSummary.of("naive", leave_one_nd_out(curves, "argmin", cfg))
    pub = RegretSummary.of("published", evaluate_fn(curves, law_lr_fn(load_law("steplaw-published"))))
    assert nested.n == naive.n == 150 and len(picks) == 15
    assert nested.mean <= 0.15
    assert nested.mean < naive.mean < pub.mean
