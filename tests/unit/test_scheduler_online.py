"""Online spectral adaptation: the pure gauge policy, and the scheduler on a quadratic of known curvature."""

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
    gauge,
    skip_reason,
    stability_lr,
    warmup_points,
)
from lrscale_megatron.curvature import HessianOperator  # noqa: F401 - the package's own core: must import
from lrscale_megatron.schedule import lr_at
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

THR = (2 + 2 * 0.9) / (1 - 0.9)  # 38: the eos threshold at beta1 = 0.9

# ----------------------------------------------------------------------------------------- policy


def _adapt(st, lam, lr, cfg=None, *, offline=1.0, warmup_done=True, step=1):
    cfg = cfg or OnlineConfig(enabled=True)
    est = lam if isinstance(lam, Estimate) else Estimate(lam)
    return adapt(
        st, est, offline_peak=offline, cfg=cfg, step=step, group=None, lr=lr, warmup_done=warmup_done
    )


def test_gauge_and_thresholds():
    cfg = OnlineConfig(rule="eos", beta1=0.9, safety=0.5)
    assert cfg.threshold == pytest.approx(THR)
    assert gauge(THR, 1.0, cfg) == pytest.approx(1.0)  # lambda = threshold / lr: the edge
    assert OnlineConfig(rule="eos", beta1=0.0).threshold == 2.0  # gradient descent: 2 / lambda
    assert OnlineConfig(rule="inverse", eta_base=2.0).threshold == 2.0
    assert stability_lr(4.0, cfg) == pytest.approx(0.5 * THR / 4.0)


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
    st = AdapterState(peak=0.3, log_ema=math.log(0.2), last_gauge=0.7)
    with caplog.at_level(logging.WARNING, logger="lrscale_megatron.adapter"):
        d = _adapt(st, est, lr=0.3, step=40)
    assert not d.accepted and why in d.reason and d.action == "skip"
    assert st.peak == 0.3 and st.log_ema == math.log(0.2) and st.last_gauge == 0.7 and st.n_skipped == 1
    assert why in caplog.text and "step 40" in caplog.text
    assert skip_reason(Estimate(1.0)) is None


def test_zero_lr_in_force_is_skipped():
    st = AdapterState(peak=1.0)
    d = _adapt(st, 10.0, lr=0.0)
    assert not d.accepted and "no LR in force" in d.reason and st.peak == 1.0


def test_hold_at_the_edge_cut_above_it():
    cfg = OnlineConfig(enabled=True, combine="max")
    st = AdapterState(peak=1.0)
    for g in (1.0, 0.3, 1.9, 2.0):  # anywhere in [raise_below, cut_above]: hold
        d = _adapt(st, g * THR / 0.5, lr=0.5, cfg=cfg)
        assert d.action == "hold" and st.peak == 1.0 and d.reason, d
    d = _adapt(st, 3.0 * THR / 0.5, lr=0.5, cfg=cfg)  # g = 3: cut so that g = safety
    assert d.action == "cut" and st.peak == pytest.approx(0.5 / 3.0) and "cut_above" in d.reason
    assert d.gauge == pytest.approx(3.0) and d.lr == 0.5


def test_a_lone_spike_is_confirmed_before_a_cut():
    st = AdapterState(peak=1.0)
    _adapt(st, 0.5 * THR, lr=1.0)
    d = _adapt(st, 5.0 * THR, lr=1.0)  # one sample far beyond the edge after one below it
    assert d.action == "confirm" and st.confirm_pending and st.peak == 1.0 and "re-measuring" in d.reason
    d = _adapt(st, 0.6 * THR, lr=1.0)  # the re-measurement is back below: hold
    assert d.action == "hold" and not st.confirm_pending and st.peak == 1.0
    _adapt(st, 5.0 * THR, lr=1.0)
    d = _adapt(st, 5.0 * THR, lr=1.0)  # confirmed: cut
    assert d.action == "cut" and st.peak == pytest.approx(0.1) and not st.confirm_pending
    st = AdapterState(peak=1.0, last_gauge=0.5)
    assert _adapt(st, 5.0 * THR, lr=1.0, cfg=OnlineConfig(confirm_cuts=False)).action == "cut"


def test_the_scheduler_remeasures_at_the_next_step_to_confirm():
    sched = LRScaleScheduler(torch.optim.SGD(Quadratic().parameters(), lr=1.0), _online_cfg(combine="min"))
    gauges = iter([0.5, 0.5, 5.0, 5.0, 1.0, 1.0, 1.0])  # steps 2, 5 (warmup), 10, 11 (re-measure), 20, ...
    sched.attach_estimator(lambda params: next(gauges) * THR / sched.core.lr_in_force(0))
    for _ in range(30):
        sched.step()
    assert [(h["step"], h["action"]) for h in sched.history] == [
        (2, "hold"),
        (5, "hold"),
        (10, "confirm"),
        (11, "cut"),
        (20, "hold"),
        (30, "hold"),
    ]


def test_cut_is_limited_by_max_cut_and_band():
    st = AdapterState(peak=1.0)
    _adapt(st, 1000.0 * THR, lr=1.0, cfg=OnlineConfig(max_cut=10.0))
    assert st.peak == pytest.approx(0.1)
    st = AdapterState(peak=1.0)
    d = _adapt(st, 1000.0 * THR, lr=1.0, cfg=OnlineConfig(band=(0.2, 10.0)))
    assert st.peak == pytest.approx(0.2) and "clamped to band" in d.reason
    assert d.proposed == pytest.approx(1.0 / 10.0)  # 0.5 / 1000 limited by max_cut = 10 first


def test_raises_only_where_allowed():
    room = 0.1 * THR  # g = 0.1 at lr = 1
    st = AdapterState(peak=1.0)
    d = _adapt(st, room, lr=1.0, cfg=OnlineConfig(combine="min"))
    assert d.action == "hold" and "combine='min'" in d.reason and st.peak == 1.0
    st = AdapterState(peak=1.0)
    d = _adapt(st, room, lr=1.0, cfg=OnlineConfig(combine="max"), warmup_done=False)
    assert d.action == "hold" and "warmup" in d.reason and st.peak == 1.0
    st = AdapterState(peak=1.0)
    d = _adapt(st, room, lr=0.4, cfg=OnlineConfig(combine="max"))  # late in the decay: lr < peak / 2
    assert d.action == "hold" and "decay" in d.reason and st.peak == 1.0
    st = AdapterState(peak=1.0)
    d = _adapt(st, room, lr=1.0, cfg=OnlineConfig(combine="max", ema=0.0, max_change=2.0))
    assert d.action == "raise" and st.peak == pytest.approx(2.0)  # 0.5 / 0.1 = 5, clamped to x2
    st = AdapterState(peak=1.0)
    _adapt(st, 0.4 * THR, lr=1.0, cfg=OnlineConfig(combine="max", raise_below=0.45, ema=0.0, max_change=9.0))
    assert st.peak == pytest.approx(0.5 / 0.4)
    st = AdapterState(peak=1.0)
    _adapt(st, 0.125 * THR, lr=1.0, cfg=OnlineConfig(combine="geomean", ema=0.0, max_change=9.0))
    assert st.peak == pytest.approx(2.0)  # half of the x4 raise, in log
    st = AdapterState(peak=1.0)
    _adapt(st, 0.01 * THR, lr=1.0, cfg=OnlineConfig(combine="online", ema=0.0, max_change=100.0))
    assert st.peak == pytest.approx(10.0)  # band high


def test_ema_smooths_raises_and_follows_the_peak():
    cfg = OnlineConfig(combine="max", ema=0.5, max_change=100.0)
    st = AdapterState(peak=1.0)
    _adapt(st, 1.0 * THR, lr=1.0, cfg=cfg)  # g = 1: hold, log_ema = 0
    d = _adapt(st, (1 / 16) * THR, lr=1.0, cfg=cfg)  # g = 1/16, smoothed sqrt(1/16) = 1/4: not < 0.25
    assert d.action == "hold" and st.log_ema == pytest.approx(math.log(0.25))
    d = _adapt(st, (1 / 16) * THR, lr=1.0, cfg=cfg)  # smoothed 1/8 -> raise x4
    assert d.action == "raise" and st.peak == pytest.approx(4.0)
    assert st.log_ema == pytest.approx(math.log(0.5))  # the smoothed gauge moved with the LR


def test_crossing_the_edge_warns_once_per_crossing(caplog):
    st = AdapterState(peak=1.0)
    gs = [0.5, 1.5, 1.2, 0.8, 1.1]
    with caplog.at_level(logging.WARNING, logger="lrscale_megatron.adapter"):
        flags = [_adapt(st, g * THR, lr=1.0).crossed_edge for g in gs]
    assert flags == [False, True, False, False, True]
    assert caplog.text.count("crossed 1") == 2


def test_curvature_peak_once_after_warmup():
    cfg = OnlineConfig(kappa=2.0, curvature_peak="max")
    st = AdapterState(peak=1.0)
    d = _adapt(st, 0.5, lr=0.001, cfg=cfg, warmup_done=False)  # not before the end of warmup
    assert d.action == "hold" and st.peak == 1.0
    d = _adapt(st, 0.5, lr=0.001, cfg=cfg)  # kappa / lambda = 4 > offline 1 -> 4
    assert d.action == "curvature" and st.peak == pytest.approx(4.0) and st.curvature_done
    d = _adapt(st, 0.5, lr=0.004, cfg=cfg)
    assert d.action == "hold" and st.peak == pytest.approx(4.0)  # once only
    st = AdapterState(peak=1.0)
    _adapt(st, 8.0, lr=0.001, cfg=OnlineConfig(kappa=2.0, curvature_peak="curv"))
    assert st.peak == pytest.approx(0.25)
    st = AdapterState(peak=1.0)
    _adapt(st, 8.0, lr=0.001, cfg=OnlineConfig(kappa=2.0, curvature_peak="max"))
    assert st.peak == 1.0  # max(offline, 0.25)
    st = AdapterState(peak=1.0)  # a curvature peak past the edge is cut in the same decision
    d = _adapt(st, 10 * THR, lr=1.0, cfg=OnlineConfig(kappa=100 * THR))
    assert d.action == "cut" and st.peak == pytest.approx(0.1)  # 10 x 0.5 / 100, but at most max_cut = 10


def test_measurement_points_in_iterations_and_samples():
    cfg = OnlineConfig(enabled=True, adapt_every=100, warmup_checks=2)
    assert warmup_points(30, OnlineConfig()) == [3, 30]  # default: warmup_first (10 %), end of warmup
    assert warmup_points(30, cfg) == [3, 15, 30]
    assert warmup_points(30, cfg.model_copy(update={"warmup_first": None})) == [15, 30]
    assert warmup_points(10, cfg) == [2, 5, 10]  # never before step 2 (one Adam step: v_hat = g^2)
    assert warmup_points(1, cfg) == [1]
    due = [s for s in range(1, 401) if crossed(s - 1, s, cfg, warmup_steps=30)]
    assert due == [3, 15, 30, 100, 200, 300, 400]
    due = [s for s in range(1, 401) if crossed(s - 1, s, OnlineConfig(adapt_every=100, warmup_checks=3), 30)]
    assert due == [3, 10, 20, 30, 100, 200, 300, 400]
    no_checks = OnlineConfig(adapt_every=100, warmup_checks=0)
    assert [s for s in range(1, 401) if crossed(s - 1, s, no_checks, 30)] == [100, 200, 300, 400]
    # Megatron-LM counts samples: increments of a global batch of 64 cross each multiple once.
    due = [s for s in range(64, 64 * 8, 64) if crossed(s - 64, s, cfg, warmup_steps=0)]
    assert due == [128, 256, 320, 448]  # crossing 100, 200, 300, 400
    assert not crossed(10, 20, OnlineConfig(adapt_every=5, start_step=50), warmup_steps=0)
    assert crossed(49, 50, OnlineConfig(adapt_every=1000, start_step=50), warmup_steps=0)
    due = [s for s in range(1, 401) if crossed(s - 1, s, OnlineConfig(adapt_every=100, start_step=20), 30)]
    assert due == [20, 30, 100, 200, 300, 400]  # the warmup check at 15 is before start_step


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


def _online_cfg(peak: float = 1.0, **online) -> LRScaleConfig:
    on = dict(enabled=True, adapt_every=10, combine="online", band=(0.01, 100.0), max_change=2.0, ema=0.0)
    on.update(online)
    return LRScaleConfig(
        peak_lr=peak, warmup_steps=5, total_steps=400, decay_style="constant", online=OnlineConfig(**on)
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


def test_real_hessian_operator_gauge_cuts_a_divergent_lr():
    """Gradient descent at lr = 2 on a quadratic with lambda_max = 4 diverges (lr > 2 / lambda); the
    gauge (rule inverse, eta_base = 2: g = lambda lr / 2) reads 4 and cuts the LR so that g = 0.5."""
    a = _quadratic()
    model = Quadratic()
    sched = LRScaleScheduler(
        torch.optim.SGD(model.parameters(), lr=2.0),
        _online_cfg(
            peak=2.0,
            rule="inverse",
            eta_base=2.0,
            precondition=False,
            combine="min",
            tol=1e-5,  # float32 products: the true-residual check cannot pass far below ~1e-6
            warmup_tol=1e-5,
            warmup_first=None,  # the in-force rule at the end of warmup (the projection: test_online_warmup)
        ),
    )
    sched.attach_curvature(model, quad_loss, a)
    _train(sched, model, a, 10)  # the cut happens at the end of warmup (step 5)
    after_cut = float(quad_loss(model, a))
    lrs = _train(sched, model, a, 30)
    h = sched.history
    assert all(x["accepted"] for x in h), h
    assert [x["lambda_max"] for x in h] == pytest.approx([LAMBDA] * len(h), rel=1e-4)
    cut = next(x for x in h if x["action"] == "cut")
    assert cut["gauge"] == pytest.approx(LAMBDA * cut["lr"] / 2.0, rel=1e-4) and cut["gauge"] > 2.0
    assert lrs[-1] == pytest.approx(0.5 * 2.0 / LAMBDA, rel=1e-4)  # g = safety after the cut
    assert all(x["action"] == "hold" for x in h[h.index(cut) + 1 :])  # no ratchet at the new LR
    assert float(quad_loss(model, a)) < after_cut / 10  # converging, not diverging


def test_nan_estimate_leaves_the_lr_unchanged():
    a = _quadratic()
    cfg = _online_cfg()
    sched = LRScaleScheduler(torch.optim.SGD(Quadratic().parameters(), lr=1.0), cfg)
    sched.attach_estimator(lambda params: Estimate(float("nan")))
    lrs = _train(sched, Quadratic(), a, 60)
    assert lrs == [
        lr_at(i, peak_lr=1.0, min_lr=0.0, warmup_steps=5, total_steps=400, decay_style="constant")
        for i in range(60)
    ]
    assert len(sched.history) == 8 and not any(h["accepted"] for h in sched.history)  # 2, 5, 10, ..., 60


def test_online_without_estimator_fails_loudly():
    sched = LRScaleScheduler(torch.optim.SGD(Quadratic().parameters(), lr=1.0), _online_cfg())
    sched.step()
    with pytest.raises(RuntimeError, match="attach_curvature"):
        sched.step()  # the first warmup check (step 2)


def test_per_group_mode_gives_each_group_its_own_gauge():
    """Per-layer mode (rule inverse: eta_l = eta_base / lambda_l): group 0 sits 3x past its edge and is
    cut; group 1 sits at its edge and is held."""
    m1, m2 = Quadratic(), Quadratic()
    opt = torch.optim.SGD([{"params": m1.parameters()}, {"params": m2.parameters()}], lr=1.0)
    sched = LRScaleScheduler(opt, _online_cfg(per_group=True, rule="inverse", eta_base=1.0, combine="min"))
    lam = {id(m1.x): 3.0, id(m2.x): 1.0}  # g = lambda * lr / 1 at the peak lr = 1: 3 and 1
    sched.attach_estimator(lambda params: lam[id(params[0])])
    for _ in range(60):
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.5 / 3.0, 1.0])
    assert {h["group"] for h in sched.history} == {0, 1}
    assert [(h["step"], h["action"]) for h in sched.history if h["group"] == 0][:3] == [
        (2, "hold"),  # warmup check at lr 0.4: g = 1.2
        (5, "cut"),  # end of warmup at lr 1: g = 3
        (10, "hold"),  # g = 0.5
    ]
    assert all(h["action"] == "hold" for h in sched.history if h["group"] == 1)


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
    """With Adam, the eos gauge reads lambda_max(P^-1/2 H P^-1/2) from the optimizer state."""
    a = _quadratic()
    model = Quadratic()
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    cfg = _online_cfg(rule="eos", safety=0.5, warmup_checks=1, warmup_first=None, tol=1e-2, warmup_tol=1e-2)
    sched = LRScaleScheduler(opt, cfg)  # tol 1e-2: this checks the operator to 1e-5, not the default tol
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
    assert first["gauge"] == pytest.approx(want * 1.0 / THR, rel=1e-5)


def test_warmup_measurements_use_the_cheaper_tolerance():
    a = _quadratic()
    model = Quadratic()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    sched = LRScaleScheduler(opt, _online_cfg(rule="eos", warmup_tol=0.5, tol=1e-10, max_iter=6))
    sched.attach_curvature(model, quad_loss, a)
    _train(sched, model, a, 10)
    h = sched.history  # steps 2 and 5 (warmup: tol 0.5), 10 (tol 1e-10)
    assert [x["step"] for x in h] == [2, 5, 10]
    assert h[0]["n_matvec"] < h[2]["n_matvec"]


def test_preconditioning_without_adam_state_is_refused_when_attached():
    """SGD has no second moment: the preconditioned measurement is refused up front (issue 9), not
    skipped at every measurement after warmup."""
    from lrscale_megatron.measurement import MeasurementRefused

    a = _quadratic()
    model = Quadratic()
    sched = LRScaleScheduler(torch.optim.SGD(model.parameters(), lr=1.0), _online_cfg(rule="eos"))
    with pytest.raises(MeasurementRefused, match="precondition"):
        sched.attach_curvature(model, quad_loss, a)
