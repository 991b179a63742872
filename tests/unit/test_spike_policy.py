"""The mixer's outlier reading (issues 9/11): a lone sample far beyond the edge after skipped measurements.

Replays, through the real scheduler with an injected estimator, the measurements of the causal MLP-Mixer
target at peak 0.01 (``benchmarks/mixer_outlier.py capture``; docs/benchmarks.md, "Mixer outlier reading"):
step 2 unconverged, step 10 converged at 3.03e5 (a real eigenvalue: float64 exact 3.035e5, but a
transient: 1.3e3 at step 9, 4.2e3 at step 12), then unconverged re-measurements. Before the guard, the
step-10 sample, the first *accepted* one, cut the peak 10x at once.
"""

from __future__ import annotations

import math

import pytest
import torch

from lrscale_megatron.adapter import CONFIRM_RETRIES, AdapterState, Estimate, OnlineConfig, adapt
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

PEAK = 0.01
THR = (2 + 2 * 0.9) / (1 - 0.9)


def _sched(**online) -> LRScaleScheduler:
    on = OnlineConfig(enabled=True, adapt_every=10, **online)
    cfg = LRScaleConfig(peak_lr=PEAK, warmup_steps=15, total_steps=40, decay_style="cosine", online=on)
    p = torch.nn.Parameter(torch.zeros(3))
    return LRScaleScheduler(torch.optim.AdamW([p], lr=PEAK), cfg)


def _run(sched: LRScaleScheduler, readings: dict[int, Estimate], default: Estimate, steps: int = 40):
    """Step the scheduler; the estimator answers ``readings[step]`` (else ``default``)."""
    sched.attach_estimator(lambda params: readings.get(sched.num_steps, default))
    for _ in range(steps):
        sched.step()
    return [(h["step"], h["action"]) for h in sched.history]


UNCONVERGED = Estimate(1.5e3, converged=False, reason="true residual ... not converged")
MIXER = {2: Estimate(6.04e4, converged=False, reason="max_iter"), 10: Estimate(3.03e5, n_matvec=7)}


def test_the_mixer_outlier_is_not_acted_on_alone():
    sched = _sched()
    actions = _run(sched, MIXER, UNCONVERGED)
    assert (10, "confirm") in actions, actions  # before the guard: (10, "cut"), peak 0.01 -> 0.001
    assert "cut" not in {a for _, a in actions}
    assert sched.core.states[0].peak == PEAK
    ten = next(h for h in sched.history if h["step"] == 10)
    assert "1 skipped measurement(s)" in ten["reason"] and "re-measuring" in ten["reason"]
    # the confirmation re-measured at 11, 12, 13 (all unusable), then gave up: no measurement every step
    steps = [s for s, _ in actions]
    assert steps == [2, 10, 11, 12, 13, 15, 20, 30, 40], steps
    dropped = next(h for h in sched.history if h["step"] == 10 + CONFIRM_RETRIES)
    assert "confirmation dropped" in dropped["reason"] and not sched.core.states[0].confirm_pending


def test_a_confirmed_outlier_is_still_cut():
    """The guard delays a cut by one measurement; a re-measurement beyond the edge too still cuts."""
    sched = _sched()
    readings = {**MIXER, 11: Estimate(1.78e5)}  # the true value at step 11 (float64 exact)
    actions = _run(sched, readings, Estimate(1.5e3))
    assert actions[:3] == [(2, "skip"), (10, "confirm"), (11, "cut")], actions
    assert sched.core.states[0].peak == pytest.approx(PEAK / 10)  # limited by max_cut


def test_the_runs_first_measurement_still_cuts_at_once():
    """Issue 11: a too-high peak is cut at the first measurement (nothing skipped before it)."""
    st = AdapterState(peak=1.0)
    d = adapt(st, Estimate(5.0 * THR), offline_peak=1.0, cfg=OnlineConfig(), step=1, group=None, lr=1.0)
    assert d.action == "cut" and st.peak == pytest.approx(0.1)


def test_after_skips_a_lone_outlier_is_confirmed_and_confirm_cuts_false_restores_the_old_rule():
    cfg = OnlineConfig()
    st = AdapterState(peak=1.0)
    kw = dict(offline_peak=1.0, group=None, lr=1.0)
    assert adapt(st, Estimate(math.nan), cfg=cfg, step=1, **kw).action == "skip"
    d = adapt(st, Estimate(5.0 * THR), cfg=cfg, step=2, **kw)
    assert d.action == "confirm" and st.confirm_pending and st.peak == 1.0
    st = AdapterState(peak=1.0)
    adapt(st, Estimate(math.nan), cfg=cfg, step=1, **kw)
    off = OnlineConfig(confirm_cuts=False)
    assert adapt(st, Estimate(5.0 * THR), cfg=off, step=2, **kw).action == "cut"


def test_pending_confirmation_survives_fewer_skips_than_the_bound():
    cfg = OnlineConfig()
    st = AdapterState(peak=1.0, last_gauge=0.5)
    kw = dict(offline_peak=1.0, group=None, lr=1.0, cfg=cfg)
    assert adapt(st, Estimate(5.0 * THR), step=1, **kw).action == "confirm"
    for i in range(CONFIRM_RETRIES - 1):
        adapt(st, UNCONVERGED, step=2 + i, **kw)
        assert st.confirm_pending and st.confirm_skips == i + 1
    d = adapt(st, Estimate(5.0 * THR), step=9, **kw)  # a usable re-measurement beyond the edge: cut
    assert d.action == "cut" and st.confirm_skips == 0 and not st.confirm_pending
