"""Online spectral adaptation: the pure policy, and the scheduler on a quadratic of known curvature."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lrscale_megatron.adapter import (
    AdapterState,
    Estimate,
    OnlineConfig,
    adapt,
    crossed,
    skip_reason,
    stability_lr,
)
from lrscale_megatron.schedule import lr_at
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

# ----------------------------------------------------------------------------------------- policy


def test_stability_rules():
    cfg = OnlineConfig(rule="eos", beta1=0.9, safety=0.5)
    assert stability_lr(4.0, cfg) == pytest.approx(0.5 * 3.8 / (0.1 * 4.0))
    assert stability_lr(4.0, OnlineConfig(rule="eos", beta1=0.0, safety=1.0)) == pytest.approx(
        0.5
    )  # 2/lambda
    assert stability_lr(4.0, OnlineConfig(rule="inverse", eta_base=2.0)) == 0.5


@pytest.mark.parametrize(
    ("est", "why"),
    [
        (Estimate(float("nan")), "non-finite"),
        (Estimate(float("inf")), "non-finite"),
        (Estimate(-3.0), "non-positive"),
        (Estimate(0.0), "non-positive"),
        (Estimate(5.0, converged=False, reason="max_iter"), "not converged (max_iter)"),
    ],
)
def test_unusable_estimates_keep_the_peak(est, why, caplog):
    st = AdapterState(peak=0.3, log_ema=math.log(0.2))
    with caplog.at_level(logging.WARNING, logger="lrscale_megatron.adapter"):
        d = adapt(st, est, offline_peak=0.1, cfg=OnlineConfig(enabled=True), step=40, group=None)
    assert not d.accepted and why in d.reason
    assert st.peak == 0.3 and st.log_ema == math.log(0.2) and st.n_skipped == 1
    assert why in caplog.text and "step 40" in caplog.text
    assert skip_reason(Estimate(1.0)) is None


def test_combine_band_and_max_change():
    base = dict(rule="inverse", eta_base=1.0, ema=0.0, band=(0.5, 4.0), max_change=100.0)
    off = 1.0
    for how, lam, want in [
        ("online", 0.5, 2.0),
        ("min", 0.5, 1.0),
        ("max", 2.0, 1.0),
        ("geomean", 0.25, 2.0),
        ("online", 0.01, 4.0),
        ("online", 100.0, 0.5),
    ]:
        st = AdapterState(peak=off)
        adapt(st, Estimate(lam), offline_peak=off, cfg=OnlineConfig(combine=how, **base), step=1, group=None)
        assert st.peak == pytest.approx(want), (how, lam)
    st = AdapterState(peak=1.0)
    cfg = OnlineConfig(combine="online", **dict(base, max_change=1.5))
    adapt(st, Estimate(0.25), offline_peak=off, cfg=cfg, step=1, group=None)
    assert st.peak == pytest.approx(1.5)


def test_ema_in_log_space():
    cfg = OnlineConfig(rule="inverse", combine="online", ema=0.5, band=(1e-3, 1e3), max_change=1e3)
    st = AdapterState(peak=1.0)
    adapt(st, Estimate(1.0), offline_peak=1.0, cfg=cfg, step=1, group=None)  # first: no smoothing
    assert st.peak == pytest.approx(1.0)
    adapt(st, Estimate(1 / 4.0), offline_peak=1.0, cfg=cfg, step=2, group=None)
    assert st.peak == pytest.approx(2.0)  # exp(0.5 log 1 + 0.5 log 4)


def test_measurement_points_in_iterations_and_samples():
    cfg = OnlineConfig(enabled=True, adapt_every=100)
    due = [s for s in range(1, 401) if crossed(s - 1, s, cfg, warmup_steps=30)]
    assert due == [30, 100, 200, 300, 400]
    # Megatron-LM counts samples: increments of a global batch of 64 cross each multiple once.
    due = [s for s in range(64, 64 * 8, 64) if crossed(s - 64, s, cfg, warmup_steps=0)]
    assert due == [128, 256, 320, 448]  # crossing 100, 200, 300, 400
    assert not crossed(10, 20, OnlineConfig(adapt_every=5, start_step=50), warmup_steps=0)


# ------------------------------------------------------------------------- scheduler on a quadratic

LAMBDA = 4.0


def _quadratic(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, LAMBDA, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


class Quadratic(torch.nn.Module):
    def __init__(self, n: int = 6):
        super().__init__()
        self.x = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))


def quad_loss(model: Quadratic, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * model.x @ a @ model.x


def _online_cfg(**online) -> LRScaleConfig:
    on = dict(enabled=True, adapt_every=10, combine="online", band=(0.01, 100.0), max_change=2.0, ema=0.5)
    on.update(online)
    return LRScaleConfig(
        peak_lr=1.0, warmup_steps=5, total_steps=400, decay_style="constant", online=OnlineConfig(**on)
    )


def _train(sched: LRScaleScheduler, model: Quadratic, a: torch.Tensor, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.zero_grad()
        quad_loss(model, a).backward()
        sched.optimizer.step()
        sched.step()
    return lrs


def test_converges_to_the_stability_lr_with_injected_estimator():
    a = _quadratic()
    model = Quadratic()
    sched = LRScaleScheduler(torch.optim.SGD(model.parameters(), lr=1.0), _online_cfg())
    sched.attach_estimator(lambda params: float(torch.linalg.eigvalsh(a)[-1]))
    _train(sched, model, a, 80)
    expected = 0.5 * (2 + 2 * 0.9) / ((1 - 0.9) * LAMBDA)  # 4.75
    assert sched.peak_lr == pytest.approx(expected, rel=1e-12)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    steps = [h["step"] for h in sched.history]
    assert steps[:3] == [5, 10, 20] and all(h["accepted"] for h in sched.history)
    # max_change=2 per adaptation: 1 -> 2 -> 4 -> 4.75
    assert [h["peak_after"] for h in sched.history[:3]] == pytest.approx([2.0, 4.0, expected])


def test_converges_with_the_real_hessian_operator():
    curvature = pytest.importorskip("lrscale_megatron.curvature")
    if not hasattr(curvature, "HessianOperator"):
        pytest.skip("lrscale_megatron.curvature.HessianOperator not available yet")
    a = _quadratic()
    model = Quadratic()
    sched = LRScaleScheduler(
        torch.optim.SGD(model.parameters(), lr=1.0),
        _online_cfg(rule="inverse", eta_base=2.0, precondition=False),
    )
    sched.attach_curvature(model, quad_loss, a)
    _train(sched, model, a, 40)
    assert all(h["accepted"] for h in sched.history), sched.history
    assert [h["lambda_max"] for h in sched.history] == pytest.approx([LAMBDA] * len(sched.history), rel=1e-6)
    assert sched.peak_lr == pytest.approx(2.0 / LAMBDA, rel=1e-6)


def test_nan_estimate_leaves_the_lr_unchanged():
    a = _quadratic()
    model = Quadratic()
    cfg = _online_cfg()
    sched = LRScaleScheduler(torch.optim.SGD(model.parameters(), lr=1.0), cfg)
    sched.attach_estimator(lambda params: Estimate(float("nan")))
    lrs = _train(sched, model, a, 60)
    c = sched.config
    assert lrs == [
        lr_at(i, peak_lr=1.0, min_lr=0.0, warmup_steps=5, total_steps=400, decay_style="constant")
        for i in range(60)
    ]
    assert len(sched.history) == 7 and not any(h["accepted"] for h in sched.history)
    assert c.online.enabled
    # After convergence, a NaN in the middle keeps the converged peak.
    values = iter([LAMBDA] * 5 + [float("nan")] + [LAMBDA] * 100)
    sched2 = LRScaleScheduler(torch.optim.SGD(Quadratic().parameters(), lr=1.0), cfg)
    sched2.attach_estimator(lambda params: next(values))
    lrs2 = _train(sched2, Quadratic(), a, 70)
    assert lrs2[45:55] == [lrs2[45]] * 10 and not sched2.history[5]["accepted"]


def test_online_without_estimator_fails_loudly():
    sched = LRScaleScheduler(torch.optim.SGD(Quadratic().parameters(), lr=1.0), _online_cfg())
    for _ in range(4):
        sched.step()
    with pytest.raises(RuntimeError, match="attach_curvature"):
        sched.step()


def test_per_group_mode_gives_each_group_its_own_peak():
    m1, m2 = Quadratic(), Quadratic()
    opt = torch.optim.SGD([{"params": m1.parameters()}, {"params": m2.parameters()}], lr=1.0)
    sched = LRScaleScheduler(opt, _online_cfg(per_group=True, rule="inverse", eta_base=1.0))
    lam = {id(m1.x): 2.0, id(m2.x): 0.5}
    sched.attach_estimator(lambda params: lam[id(params[0])])
    for _ in range(60):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 2.0])
    assert {h["group"] for h in sched.history} == {0, 1}


def test_user_group_ratios_are_kept():
    """DeepSpeed #7713: a group created with its own lr keeps its ratio to the default lr."""
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": m1.parameters()}, {"params": m2.parameters(), "lr": 1e-4}], lr=1e-3)
    sched = LRScaleScheduler(opt, LRScaleConfig(peak_lr=3e-3, min_lr=3e-4, warmup_steps=10, total_steps=100))
    sched.attach_estimator(lambda params: 1.0)
    for step in range(120):
        lr0, lr1 = (g["lr"] for g in opt.param_groups)
        assert lr0 == lr_at(
            step, peak_lr=3e-3, min_lr=3e-4, warmup_steps=10, total_steps=100, decay_style="cosine"
        )
        assert lr1 == pytest.approx(0.1 * lr0, rel=1e-12, abs=0.0)
        sched.step()


def test_eos_rule_measures_the_adam_preconditioned_hessian():
    """With Adam, the eos bound is applied to lambda_max(P^-1/2 H P^-1/2) from the optimizer state."""
    a = _quadratic()
    model = Quadratic()
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    sched = LRScaleScheduler(opt, _online_cfg(rule="eos", safety=0.5))
    sched.attach_curvature(model, quad_loss, a)
    _train(sched, model, a, 5)  # one measurement at the end of warmup (step 5), after the 5th Adam step
    first = sched.history[0]
    assert first["accepted"], first
    st = opt.state[model.x]
    vhat = st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))
    d = 1.0 / torch.sqrt(torch.sqrt(vhat.double()) + 1e-8)
    want = float(torch.linalg.eigvalsh(d[:, None] * a * d[None, :])[-1])
    assert first["lambda_max"] == pytest.approx(want, rel=1e-5)
    assert abs(first["lambda_max"] - LAMBDA) > 1e-3 * LAMBDA  # not the raw Hessian's top eigenvalue


def test_preconditioning_without_adam_state_is_skipped_with_the_reason(caplog):
    a = _quadratic()
    model = Quadratic()
    sched = LRScaleScheduler(torch.optim.SGD(model.parameters(), lr=1.0), _online_cfg(rule="eos"))
    sched.attach_curvature(model, quad_loss, a)
    lrs = _train(sched, model, a, 12)
    assert not any(h["accepted"] for h in sched.history)
    assert "no Adam preconditioner" in caplog.text and "betas" in caplog.text
    assert lrs[-1] == lrs[6]  # the LR did not move
