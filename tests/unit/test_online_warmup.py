"""Issue 11, second pass: the projected gauge during warmup and the warm-started measurement.

* during warmup a curvature below the edge for the LR in force is projected to the peak
  (``g_peak = lambda * peak / threshold``) and a peak beyond ``cut_above`` is cut at the first (early) check,
  to ``g_peak = warmup_safety``; a peak within it is held; near the edge (pinned by the LR in force) the
  projection is not used;
* a warm-started Lanczos gives the dense reference's top eigenvalue with fewer products, and a stale start
  vector (the top direction moved) still gives the right one, never a stale value marked converged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrscale_megatron.adapter import AdapterState, Estimate, OnlineConfig, adapt
from lrscale_megatron.measurement import WarmStart, measure_lambda_max
from lrscale_megatron.parallel import ParallelContext
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler
from lrscale_megatron.scheduler_config import LRScaleConfigError

PEAK, WARMUP, TOTAL = 8e-3, 100, 1000


def _adapt_early(cfg: OnlineConfig, lam: float, lr: float):
    """One adaptation at step 10 of the warmup, from a fresh state at ``PEAK``, with ``lr`` in force."""
    return adapt(
        AdapterState(peak=PEAK),
        Estimate(lam),
        offline_peak=PEAK,
        cfg=cfg,
        step=10,
        group=None,
        lr=lr,
        warmup_done=False,
    )


def _sched(**online) -> LRScaleScheduler:
    cfg = LRScaleConfig(
        peak_lr=PEAK,
        min_lr=PEAK / 10,
        warmup_steps=WARMUP,
        total_steps=TOTAL,
        online=OnlineConfig(enabled=True, adapt_every=100, **online),
    )
    return LRScaleScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK), cfg)


def _run_constant_curvature(g_peak: float, **online) -> LRScaleScheduler:
    """An estimator with a fixed (unstabilised) curvature that reads ``g_peak`` at the offline peak."""
    sched = _sched(**online)
    lam = g_peak * sched.config.online.threshold / PEAK
    sched.attach_estimator(lambda params: lam)
    for _ in range(WARMUP):
        sched.step()
    return sched


def test_a_peak_beyond_the_edge_is_cut_at_the_first_warmup_check():
    sched = _run_constant_curvature(5.0)
    first = sched.history[0]
    assert first["step"] == WARMUP // 10 and first["action"] == "cut"  # at 10 % of the warmup
    assert first["gauge"] == pytest.approx(0.5)  # the LR in force is 1/10 of the peak: g far below 1
    assert first["peak_after"] == pytest.approx(PEAK / 5.0)  # g_peak -> warmup_safety = 1
    assert "projected" in first["reason"]
    assert all(h["action"] == "hold" for h in sched.history[1:])  # g_peak = 1 after the cut


def test_a_peak_within_the_edge_is_held_in_warmup():
    sched = _run_constant_curvature(1.9)  # g_peak <= cut_above = 2
    assert [h["action"] for h in sched.history] == ["hold"] * 2  # 10 % and 100 % of the warmup
    assert sched.peak_lr == PEAK


def test_projection_off_or_after_warmup_reads_the_lr_in_force():
    sched = _run_constant_curvature(5.0, project_below=0.0)
    assert sched.history[0]["action"] == "hold"  # g = 0.5 in force at 10 % of the warmup: no cut
    st = AdapterState(peak=PEAK)
    cfg = OnlineConfig()
    lam = 5.0 * cfg.threshold / PEAK
    d = adapt(st, Estimate(lam), offline_peak=PEAK, cfg=cfg, step=200, group=None, lr=PEAK / 10)
    assert d.action == "hold"  # after warmup: a low LR in force (decay) is not projected


@pytest.mark.parametrize("g", [0.85, 1.0, 1.2])
def test_near_the_edge_the_curvature_is_not_projected(g):
    """The sharpness may be pinned at the edge by the LR in force (Adam's self-stabilisation)."""
    cfg = OnlineConfig()
    lr = PEAK / 10
    lam = g * cfg.threshold / lr  # g_peak = 10 g
    d = _adapt_early(cfg, lam, lr)
    assert d.action == "hold" and d.peak_after == PEAK


def test_far_above_the_edge_in_warmup_the_stricter_of_both_cuts():
    cfg = OnlineConfig()
    lr = PEAK / 3
    lam = 3.0 * cfg.threshold / lr  # g = 3 in force, g_peak = 9 at the peak
    d = _adapt_early(cfg, lam, lr)
    assert d.action == "cut"
    assert d.peak_after == pytest.approx(PEAK / 9.0)  # g_peak -> 1 (the in-force rule: PEAK / 6)
    assert lam * lr * (d.peak_after / PEAK) / cfg.threshold < 1.0  # the LR in force below the edge


@pytest.mark.parametrize(
    "field,value",
    [
        ("warmup_first", 0.0),
        ("warmup_first", 1.5),
        ("project_below", 1.2),
        ("project_above", 0.9),
        ("warmup_safety", 0.0),
    ],
)
def test_new_settings_are_validated(field, value):
    with pytest.raises(LRScaleConfigError, match=field):
        OnlineConfig(**{field: value})


# ------------------------------------------------------------------------------------ warm start


def _spd(n: int, top: int, seed: int) -> torch.Tensor:
    """Symmetric, eigenvalues 1..n/2 spread plus one clear top eigenvalue along basis vector ``top``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    e = torch.zeros(n, dtype=torch.float64)
    e[top] = 1.0
    return a + 3.0 * torch.outer(e, e)


class Quad(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))


def _measure(a: torch.Tensor, model: Quad, warm: WarmStart | None, tol: float = 1e-8):
    return measure_lambda_max(
        model,
        lambda m, b: 0.5 * m.x @ b @ m.x,
        a,
        mode="exact",
        max_iter=60,
        tol=tol,
        parallel=ParallelContext.single(),
        warm=warm,
    )


def test_warm_start_matches_the_dense_reference_with_fewer_products():
    n = 60
    model, warm = Quad(n), WarmStart()
    a = _spd(n, top=0, seed=0)
    cold = _measure(a, model, None)
    first = _measure(a, model, warm)
    a2 = a + 1e-3 * _spd(n, top=0, seed=1)  # the curvature moved a little
    second = _measure(a2, model, warm)
    ref1, ref2 = (float(np.linalg.eigvalsh(m.numpy())[-1]) for m in (a, a2))
    assert cold.converged and first.converged and second.converged
    assert first.lambda_max == pytest.approx(ref1, rel=1e-7) and first.n_matvec == cold.n_matvec
    assert second.lambda_max == pytest.approx(ref2, rel=1e-7)
    assert second.n_matvec < first.n_matvec  # the previous Ritz vector was a good start


def test_a_stale_start_vector_still_finds_the_top_eigenvalue():
    """The previous top direction is now an interior eigenvector: the result is the new top, not it."""
    n = 60
    model, warm = Quad(n), WarmStart()
    a = _spd(n, top=0, seed=0)
    assert _measure(a, model, warm).converged
    b = _spd(n, top=1, seed=0) + 1.5 * torch.outer(
        torch.eye(n, dtype=torch.float64)[0], torch.eye(n)[0].double()
    )
    ref = np.linalg.eigvalsh(b.numpy())
    assert ref[-1] - ref[-2] > 1.0  # the old direction (eigenvalue ~2.5) is no longer the top (~4)
    est = _measure(b, model, warm)
    assert est.converged and est.lambda_max == pytest.approx(float(ref[-1]), rel=1e-7)


def test_an_unconverged_measurement_does_not_seed_the_next():
    n = 60
    model, warm = Quad(n), WarmStart()
    a = _spd(n, top=0, seed=0)
    assert _measure(a, model, warm).converged and warm.start(_backend(model), None, 0) is not None
    bad = measure_lambda_max(
        model,
        lambda m, b: 0.5 * m.x @ b @ m.x,
        a,
        mode="exact",
        max_iter=2,
        tol=1e-12,
        parallel=ParallelContext.single(),
        warm=warm,
    )
    assert not bad.converged
    assert warm.start(_backend(model), None, 0) is None  # forgotten: the next one starts cold
    assert not warm.wants_vector(None)  # and does not pay for a vector (a second pass if unconverged)
    again = measure_lambda_max(
        model,
        lambda m, b: 0.5 * m.x @ b @ m.x,
        a,
        mode="exact",
        max_iter=2,
        tol=1e-12,
        parallel=ParallelContext.single(),
        warm=warm,
    )
    # no vector this time (no second pass; with the basis in host memory the vector costs no product)
    assert not again.converged and again.n_matvec == 2 <= bad.n_matvec
    for _ in range(WarmStart.RECOVER):
        assert not warm.wants_vector(None)
        assert _measure(a, model, warm).converged
    assert warm.wants_vector(None)  # RECOVER converged ones in a row: vectors again


def _backend(model: Quad):
    from lrscale_megatron.curvature import HessianOperator

    return HessianOperator(
        model,
        lambda m, b: 0.5 * m.x @ b @ m.x,
        torch.eye(len(model.x), dtype=torch.float64),
        parallel=ParallelContext.single(),
    ).backend


def test_the_curvature_peak_does_not_undo_a_warmup_cut():
    """``max(eta_pred, kappa / lambda)`` after a warmup cut: ``eta_pred`` is the cut peak, not the law's."""
    cfg = OnlineConfig(kappa=1.0, combine="max")
    st = AdapterState(peak=PEAK)
    lam = 5.0 * cfg.threshold / PEAK  # g_peak = 5 at the first check
    cut = adapt(
        st, Estimate(lam), offline_peak=PEAK, cfg=cfg, step=10, group=None, lr=PEAK / 10, warmup_done=False
    )
    assert cut.action == "cut" and st.peak == pytest.approx(PEAK / 5)
    lam_after = 0.2 * cfg.threshold / st.peak  # g = 0.2 at the end of warmup; kappa / lambda << PEAK / 5
    d = adapt(st, Estimate(lam_after), offline_peak=PEAK, cfg=cfg, step=100, group=None, lr=st.peak)
    assert d.action == "curvature" and d.peak_after == pytest.approx(PEAK / 5)  # not back to PEAK


def test_beyond_the_edge_early_in_warmup_is_projected():
    """g = 1.5 (within cut_above, beyond project_above) at 10 % of the warmup: g_peak = 15, cut (x10 max)."""
    cfg = OnlineConfig()
    lr = PEAK / 10
    d = _adapt_early(cfg, 1.5 * cfg.threshold / lr, lr)
    assert d.action == "cut" and d.peak_after == pytest.approx(PEAK / cfg.max_cut)
