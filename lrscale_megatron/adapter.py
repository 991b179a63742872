"""Online spectral adaptation of the peak learning rate: the gauge policy.

Each measurement of the top Hessian eigenvalue ``lambda`` (Adam-preconditioned by default) is read as the
**gauge** ``g = lambda * lr(t) / threshold`` against the LR *in force* at step ``t`` (``f(t) * peak``, not the
peak): ``threshold = (2 + 2*beta1) / (1 - beta1)`` for ``rule="eos"`` (Cohen et al. 2022, "Adaptive
gradient methods at the edge of stability": Adam with momentum ``beta1`` is stable while the
preconditioned sharpness stays below ``threshold / lr``; ``beta1 = 0`` gives the ``2 / lambda`` of Cohen
et al. 2021), ``eta_base`` for ``rule="inverse"`` (``eta = eta_base / lambda``, the layer-wise scheme).
``g ~ 1`` at the edge of stability. Under Adam the sharpness self-stabilises at the edge for the LR in
force, so ``g ~ 1`` is healthy training, not a reason to act; comparing the bound with the *peak* (as a
first version did) turned that equilibrium into a ratchet.

Decisions (one per measurement and param group, each logged with its reason):

* **skip** an unusable estimate (NaN / Inf, ``lambda <= 0``, not converged) or one taken at ``lr(t) = 0``:
  the peak is kept;
* **curvature** (only with ``kappa``, once, at the first measurement at or after the end of warmup): the
  peak becomes ``max(offline, kappa / lambda)`` (or ``kappa / lambda``; ``offline`` is the current peak if a
  warmup cut lowered it) and then goes through the cut test;
* **cut** when ``g > cut_above``: the peak is scaled so that ``g`` becomes ``safety`` (at most ``max_cut``).
  With ``confirm_cuts`` (default) a cut needs the previous measurement at or above the edge too (or no
  measurement at all before it: the run's very first one): otherwise the action is **confirm** and the core
  re-measures at the next step, because at the edge of stability the sharpness oscillates and a single
  sample far beyond it is not an instability. Skipped measurements do not make a later one "the first": the
  causal Mixer's preconditioned sharpness, measured at every warmup step, jumped 240x in one step (1.3e3 at
  step 9, 3.0e5 at step 10, 4.2e3 at step 12, float64 exact) and, after a skipped reading, that lone sample
  cut the peak 10x (docs/benchmarks.md, "Mixer outlier reading"). A pending confirmation whose
  re-measurements are all skipped is dropped after :data:`CONFIRM_RETRIES` of them (peak kept);
* **during warmup** the test reads the *projected* gauge ``g_peak = lambda * peak / threshold`` (what the gauge
  will read when warmup reaches the peak, if the curvature stays) whenever ``g < project_below`` (below the
  edge the sharpness is the model's own: the classic ``lr <= 2 / lambda`` check, done before the LR gets
  there) or ``g > project_above`` (beyond the edge while the LR still rises), and a cut takes the peak to
  ``g_peak = warmup_safety`` (or the LR in force to ``g = safety`` if lower). Near the edge
  (``project_below <= g <= project_above``) the sharpness may be held
  there by the LR in force (Adam self-stabilises at the edge), which says nothing about the peak: hold.
  The ``warmup_first`` check (10 % of the warmup by default) catches a too-high peak before it has cost
  the run;
* **raise**, only where ``combine`` lets the peak rise, after warmup, while the schedule is at >= half
  its peak, when the smoothed gauge is below ``raise_below``: towards ``g = safety``, at most ``max_change``;
* **hold** otherwise;

then the peak is clamped to ``band`` x the offline peak. The peak scales the whole schedule (``min_lr`` and
``init_lr`` scale with it, :meth:`~lrscale_megatron.lrscale_core.LRScaleCore.schedule_scale`), so the LR in
force after a change of the peak by ``r`` is ``r`` times what it was. A warning is logged when ``g`` crosses 1.
Everything here is pure (no ``torch.distributed``); the only call into the curvature core is
:func:`measure_lambda_max`, so the policy is testable with an injected estimator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lrscale_megatron.scheduler_config import Combine, HvpMode, OnlineConfig, Rule

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterState",
    "Combine",
    "Decision",
    "Estimate",
    "Estimator",
    "HvpMode",
    "OnlineConfig",
    "Rule",
    "adapt",
    "crossed",
    "gauge",
    "skip_reason",
    "stability_lr",
]

#: The earliest step of the ``warmup_first`` check: after one Adam step the second moment is a single squared
#: gradient and the preconditioned sharpness is not the model's (measured 9-15x its value one step later).
FIRST_CHECK_MIN_STEP = 2

#: Re-measurements a pending cut confirmation waits for a usable estimate before it is dropped (peak kept):
#: without a bound, an estimator that keeps refusing re-measures at every step.
CONFIRM_RETRIES = 3

#: Raises only while the LR in force is at least this fraction of the peak (not late in the decay, where
#: a small gauge says the decay lowered the LR, not that the peak is too low).
RAISE_MIN_FRACTION = 0.5


@dataclass(frozen=True)
class Estimate:
    """One curvature measurement: the top eigenvalue and whether the solver trusts it."""

    lambda_max: float
    converged: bool = True
    reason: str | None = None
    n_matvec: int = 0
    residual: float = math.nan


#: An estimator takes the parameters to restrict the Hessian to (``None``: all) and measures.
Estimator = Callable[[Sequence[Any] | None], Estimate]


@dataclass
class AdapterState:
    """Policy state of one adapted peak (one per param group in per-group mode); plain data for checkpoints.

    ``log_ema`` is the smoothed log-gauge (rescaled whenever the peak moves), ``last_gauge`` the previous
    measurement's gauge (crossing warning, cut confirmation), ``curvature_done`` whether the ``kappa`` peak
    was set, ``confirm_pending`` whether a re-measurement is due at the next step, ``confirm_skips`` how
    many of those re-measurements were skipped.
    """

    peak: float
    log_ema: float | None = None
    last_gauge: float | None = None
    n_accepted: int = 0
    n_skipped: int = 0
    curvature_done: bool = False
    confirm_pending: bool = False
    confirm_skips: int = 0


@dataclass(frozen=True)
class Decision:
    """What one measurement did; the scheduler's ``history`` entries are these, as dicts.

    ``lr`` is the LR in force when measured, ``gauge`` = ``lambda_max * lr / threshold``, ``action`` one of
    ``skip | hold | confirm | cut | raise | curvature``, ``reason`` says why (always set), ``proposed`` is the peak
    the rule asked for before ``band`` clamping.
    """

    step: int
    group: int | None
    lambda_max: float
    accepted: bool
    reason: str | None
    proposed: float
    peak_before: float
    peak_after: float
    n_matvec: int = 0
    lr: float = math.nan
    gauge: float = math.nan
    action: str = "skip"
    crossed_edge: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def skip_reason(est: Estimate) -> str | None:
    """Why an estimate must not be used, or ``None`` if it is usable."""
    lam = est.lambda_max
    if not math.isfinite(lam):
        return f"non-finite lambda_max={lam}" + (f" ({est.reason})" if est.reason else "")
    if lam <= 0.0:
        return f"non-positive lambda_max={lam} (no curvature bound)"
    if not est.converged:
        return f"not converged ({est.reason or 'no reason given'}), lambda_max={lam}"
    return None


def gauge(lam: float, lr: float, cfg: OnlineConfig) -> float:
    """``lambda * lr / threshold``: 1 at the edge of stability for the LR in force ``lr``."""
    return lam * lr / cfg.threshold


def stability_lr(lam: float, cfg: OnlineConfig) -> float:
    """The LR at the edge of stability for curvature ``lam > 0`` times ``safety`` (``g = safety``)."""
    return cfg.safety * cfg.threshold / lam


def adapt(
    state: AdapterState,
    est: Estimate,
    *,
    offline_peak: float,
    cfg: OnlineConfig,
    step: int,
    group: int | None,
    lr: float,
    warmup_done: bool = True,
) -> Decision:
    """Update ``state`` in place from one estimate taken while the LR in force was ``lr``; see the module."""
    before = state.peak
    where = "" if group is None else f" (param group {group})"
    reason = skip_reason(est)
    if reason is None and not (math.isfinite(lr) and lr > 0.0):
        reason = f"no LR in force (lr={lr}): the gauge is undefined"
    if reason is not None:
        state.n_skipped += 1
        if state.confirm_pending:
            state.confirm_skips += 1
            if state.confirm_skips >= CONFIRM_RETRIES:
                state.confirm_pending, state.confirm_skips = False, 0
                reason += (
                    f"; cut confirmation dropped after {CONFIRM_RETRIES} unusable re-measurements "
                    "(the lone sample beyond the edge stays unconfirmed)"
                )
        logger.warning(
            "lrscale: step %d%s: curvature estimate skipped: %s; peak LR kept at %.6g",
            step,
            where,
            reason,
            before,
        )
        return Decision(
            step, group, est.lambda_max, False, reason, math.nan, before, before, est.n_matvec, lr
        )
    lam = est.lambda_max
    g = gauge(lam, lr, cfg)
    crossed_edge = g > 1.0 and (state.last_gauge is None or state.last_gauge <= 1.0)
    if crossed_edge:
        logger.warning(
            "lrscale: step %d%s: gauge g = lambda_max*lr/threshold = %.3g crossed 1 (lambda_max=%.6g, "
            "lr=%.6g): training is at or beyond the edge of stability",
            step,
            where,
            g,
            lam,
            lr,
        )
    prev_gauge, state.last_gauge = state.last_gauge, g
    # only the run's very first measurement may cut alone: after skipped ones it is no longer the first
    first = prev_gauge is None and state.n_skipped == 0
    confirmed = first or (prev_gauge is not None and prev_gauge > 1.0) or not cfg.confirm_cuts
    state.confirm_pending, state.confirm_skips = False, 0
    state.log_ema = (
        math.log(g) if state.log_ema is None else cfg.ema * state.log_ema + (1 - cfg.ema) * math.log(g)
    )
    g_smooth = math.exp(state.log_ema)
    target, action = before, "hold"
    why = f"g={g:.3g} within (.., cut_above={cfg.cut_above:g}]"
    if cfg.kappa is not None and warmup_done and not state.curvature_done:
        state.curvature_done = True
        eta_curv = cfg.kappa / lam
        pred = min(offline_peak, before)  # a warmup cut has already overruled the offline peak
        target = max(pred, eta_curv) if cfg.curvature_peak == "max" else eta_curv
        action = "curvature"
        why = f"curvature peak kappa/lambda={eta_curv:.4g} ({cfg.curvature_peak} with {pred:.4g})"
    g_new = g * target / before
    # during warmup, away from the edge, the curvature is projected to the peak (see project_below)
    project = not warmup_done and cfg.project_below > 0 and (g < cfg.project_below or g > cfg.project_above)
    g_peak = g * target / lr if project else g_new
    what = f"projected to the peak g_peak={g_peak:.3g}" if project else f"g={g_new:.3g}"
    if g_peak > cfg.cut_above and not confirmed and action == "hold":
        state.confirm_pending = True
        action = "confirm"
        after = (
            f"after g={prev_gauge:.3g} <= 1"
            if prev_gauge is not None
            else f"after {state.n_skipped} skipped measurement(s) and none usable"
        )
        why = (
            f"{what} > cut_above={cfg.cut_above:g} {after}: one sample beyond the "
            "edge (sharpness oscillates there at the edge of stability); re-measuring at the next step"
        )
    elif g_peak > cfg.cut_above:
        aim = target * cfg.safety / g_new  # the LR in force at g = safety
        if project:
            aim = min(aim, target * cfg.warmup_safety / g_peak)  # the peak at g_peak = warmup_safety
        target = max(aim, before / cfg.max_cut)
        action = "cut"
        why = f"{what} > cut_above={cfg.cut_above:g}: cut towards " + (
            f"g_peak={cfg.warmup_safety:g}" if project else f"g={cfg.safety:g}"
        )
    elif action == "hold" and g_smooth < cfg.raise_below:
        if cfg.combine == "min":
            why = f"room (smoothed g={g_smooth:.3g} < {cfg.raise_below:g}) but combine='min' never raises the peak"
        elif not warmup_done:
            why = f"room (smoothed g={g_smooth:.3g}) but raises wait for the end of warmup"
        elif lr < RAISE_MIN_FRACTION * before:
            why = f"room (smoothed g={g_smooth:.3g}) but the LR in force is < {RAISE_MIN_FRACTION} x peak (decay)"
        else:
            factor = cfg.safety / g_smooth
            factor = min(math.sqrt(factor) if cfg.combine == "geomean" else factor, cfg.max_change)
            target, action = before * factor, "raise"
            why = f"smoothed g={g_smooth:.3g} < raise_below={cfg.raise_below:g}: raise x{factor:.3g}"
    proposed = target
    lo, hi = cfg.band
    target = min(max(target, lo * offline_peak), hi * offline_peak)
    if target != proposed:
        why += f"; clamped to band [{lo:g}, {hi:g}] x offline peak"
    if not (math.isfinite(target) and target > 0.0):  # cannot happen with finite inputs; never apply it
        target, why = before, f"{why}; non-finite target {target}, peak kept"
    state.peak = target
    if target != before:
        state.log_ema += math.log(target / before)  # the smoothed gauge follows the new LR
    state.n_accepted += 1
    log = logger.warning if action == "cut" else logger.info
    log(
        "lrscale: step %d%s: lambda_max=%.6g at lr=%.6g: g=%.3g -> %s (%s), peak LR %.6g -> %.6g",
        step,
        where,
        lam,
        lr,
        g,
        action,
        why,
        before,
        target,
    )
    return Decision(
        step, group, lam, True, why, proposed, before, target, est.n_matvec, lr, g, action, crossed_edge
    )


def warmup_points(warmup_steps: int, cfg: OnlineConfig) -> list[int]:
    """Steps of the measurements during warmup: the ``warmup_first`` check and ``k * warmup_steps / n``
    (the last at ``warmup_steps``)."""
    n = cfg.warmup_checks
    if warmup_steps <= 0 or n <= 0:
        return []
    points = {max(1, round(k * warmup_steps / n)) for k in range(1, n + 1)}
    if cfg.warmup_first is not None:
        points.add(min(warmup_steps, max(FIRST_CHECK_MIN_STEP, round(cfg.warmup_first * warmup_steps))))
    return sorted(points)


def crossed(prev_step: int, new_step: int, cfg: OnlineConfig, warmup_steps: int) -> bool:
    """Whether a measurement is due when the step moves from ``prev_step`` to ``new_step``.

    Due when a warmup check (:func:`warmup_points`), a multiple of ``adapt_every`` or ``start_step`` lies
    in ``(prev_step, new_step]`` at or after ``start_step``. Works for increments of 1 (iterations) and of a
    batch size (Megatron-LM's samples).
    """
    if new_step <= prev_step:
        return False
    start = 0 if cfg.start_step is None else cfg.start_step
    if new_step < start:
        return False
    if cfg.start_step is not None and prev_step < start <= new_step:
        return True
    m = (new_step // cfg.adapt_every) * cfg.adapt_every
    if prev_step < m and m >= start and m > 0:
        return True
    return any(prev_step < p <= new_step and p >= start for p in warmup_points(warmup_steps, cfg))


def __getattr__(name: str) -> Any:
    """``measure_lambda_max`` / ``curvature_estimator`` and the other measurement names live in
    :mod:`lrscale_megatron.measurement` (which imports this module); re-exported here lazily."""
    if name in _MEASUREMENT_NAMES:
        from lrscale_megatron import measurement

        return getattr(measurement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MEASUREMENT_NAMES = (
    "preflight",
    "second_moments",
    "preconditioned_operator",
    "MeasurementRefused",
    "MomentsUnavailable",
    "measurement_memory",
)
