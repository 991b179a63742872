"""Online spectral adaptation of the peak learning rate.

Every ``adapt_every`` steps (and once when warmup ends) the scheduler measures the top Hessian
eigenvalue ``lambda`` of the loss on a held batch and turns it into a peak LR:

* ``rule="eos"`` (default): the preconditioned edge-of-stability bound of Cohen et al. 2022,
  "Adaptive gradient methods at the edge of stability": Adam with momentum ``beta1`` is stable while
  the (preconditioned) sharpness stays below ``(2 + 2*beta1) / ((1 - beta1) * lr)``, so
  ``lr = safety * (2 + 2*beta1) / ((1 - beta1) * lambda)``. For plain gradient descent
  (``beta1 = 0``) this is the classical ``2 / lambda`` of Cohen et al. 2021.
* ``rule="inverse"``: ``lr = eta_base / lambda`` (``eta_base`` carries its own safety margin).

The proposal is smoothed with an exponential moving average in log space, combined with the offline
(law / explicit) peak (``combine``), clamped to a band around the offline peak and to a maximum change
per adaptation. An estimate that is NaN, Inf, non-positive or not converged is skipped: the peak is
kept and the reason logged. Everything here is pure (no ``torch.distributed``); the only call into the
curvature core is :func:`measure_lambda_max`, so the policy is testable with an injected estimator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

Rule = Literal["eos", "inverse"]
Combine = Literal["min", "max", "geomean", "online"]
HvpMode = Literal["exact", "fd"]


@dataclass(frozen=True)
class OnlineConfig:
    """Online adaptation settings (the ``online`` block of the scheduler params).

    Attributes:
        enabled: adapt the peak from measured curvature. Off by default.
        adapt_every: measure every this many steps (default 1000: with ``hvp="fd"`` a measurement costs
            about ``max_iter`` + 1 gradients, so the steady-state overhead stays near 1-2 %; see
            docs/benchmarks.md) (iterations under DeepSpeed / PyTorch; samples under
            Megatron-LM, where a measurement happens whenever a multiple of it is crossed).
        start_step: first step at which to measure; ``None`` means the end of warmup (``warmup_steps``).
        rule: ``"eos"`` (Cohen et al. 2022 bound times ``safety``) or ``"inverse"`` (``eta_base/lambda``).
        beta1: Adam's first-moment coefficient used by the ``eos`` bound.
        safety: multiplier (0, 1] applied to the ``eos`` bound.
        eta_base: numerator of the ``inverse`` rule.
        ema: weight of the previous smoothed log-LR (0 = no smoothing, must be < 1).
        combine: how online and offline peaks combine. ``"min"`` (default: the offline peak is never
            exceeded and the stability bound is never crossed), ``"max"``, ``"geomean"`` or ``"online"``
            (offline only serves as the clamp reference).
        band: ``(low, high)`` multipliers of the offline peak that bound the adapted peak.
        max_change: largest factor by which one adaptation may move the peak (> 1).
        per_group: measure each optimizer param group separately and give each its own peak.
        hvp: Hessian-vector product mode for the curvature core: ``"fd"`` (default: forward finite
            differences with a cached base gradient, one gradient per product, 0.12 % from exact on a
            trained float32 GPT, tests/unit/test_curvature_settings.py) or ``"exact"`` (double backward, ~3.3 gradients per product on CPU).
        precondition: measure the Adam-preconditioned Hessian ``P^-1/2 H P^-1/2`` (``P = sqrt(v̂) + eps``
            from the optimizer's bias-corrected second moment), the quantity the ``eos`` bound is
            stated for (Cohen et al. 2022). ``False`` measures the raw Hessian (pair it with
            ``rule="inverse"``). Needs a torch Adam-type optimizer holding the model's parameters
            (not ZeRO-1/2 flat partitions: there the measurement is skipped with the reason).
        max_iter: Lanczos iterations per measurement.
        tol: Lanczos relative residual tolerance.
        seed: Lanczos start-vector seed (fixed: identical estimates on every rank and on resume).
    """

    enabled: bool = False
    adapt_every: int = 1000
    start_step: int | None = None
    rule: Rule = "eos"
    beta1: float = 0.9
    safety: float = 0.5
    eta_base: float = 1.0
    ema: float = 0.5
    combine: Combine = "min"
    band: tuple[float, float] = (0.1, 10.0)
    max_change: float = 2.0
    per_group: bool = False
    hvp: HvpMode = "fd"
    precondition: bool = True
    max_iter: int = 20
    tol: float = 1e-3
    seed: int = 0


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
    """Smoothing state of one adapted peak (one per param group in per-group mode)."""

    peak: float
    log_ema: float | None = None
    n_accepted: int = 0
    n_skipped: int = 0


@dataclass(frozen=True)
class Decision:
    """What one adaptation did; ``history`` entries of the scheduler are these, as dicts."""

    step: int
    group: int | None
    lambda_max: float
    accepted: bool
    reason: str | None
    proposed: float
    peak_before: float
    peak_after: float
    n_matvec: int = 0

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


def stability_lr(lam: float, cfg: OnlineConfig) -> float:
    """Raw peak LR allowed by curvature ``lam > 0`` under ``cfg.rule``."""
    if cfg.rule == "eos":
        # Cohen et al. 2022: Adam is stable while lambda(P^-1 H) < (2 + 2 b1) / ((1 - b1) lr).
        return cfg.safety * (2.0 + 2.0 * cfg.beta1) / ((1.0 - cfg.beta1) * lam)
    return cfg.eta_base / lam


def combine_peaks(offline: float, online: float, how: str) -> float:
    """Combine the offline and the (smoothed) online peak."""
    if how == "min":
        return min(offline, online)
    if how == "max":
        return max(offline, online)
    if how == "geomean":
        return math.sqrt(offline * online)
    if how == "online":
        return online
    raise ValueError(f"combine={how!r} is not one of ('min', 'max', 'geomean', 'online')")


def adapt(
    state: AdapterState,
    est: Estimate,
    *,
    offline_peak: float,
    cfg: OnlineConfig,
    step: int,
    group: int | None,
) -> Decision:
    """Update ``state`` in place from one estimate and return what was done.

    1. reject unusable estimates (NaN/Inf, lambda <= 0, not converged): peak unchanged;
    2. proposal = stability_lr(lambda);
    3. EMA in log space: s = ema * s_prev + (1 - ema) * log(proposal) (first: s = log(proposal));
    4. combine exp(s) with the offline peak;
    5. clamp to [band_lo, band_hi] * offline_peak;
    6. clamp to [peak / max_change, peak * max_change].
    """
    before = state.peak
    reason = skip_reason(est)
    if reason is not None:
        state.n_skipped += 1
        where = "" if group is None else f" (param group {group})"
        logger.warning(
            "lrscale: step %d%s: curvature estimate skipped: %s; peak LR kept at %.6g",
            step,
            where,
            reason,
            before,
        )
        return Decision(step, group, est.lambda_max, False, reason, math.nan, before, before, est.n_matvec)
    proposed = stability_lr(est.lambda_max, cfg)
    log_p = math.log(proposed)
    state.log_ema = log_p if state.log_ema is None else cfg.ema * state.log_ema + (1.0 - cfg.ema) * log_p
    target = combine_peaks(offline_peak, math.exp(state.log_ema), cfg.combine)
    lo, hi = cfg.band
    target = min(max(target, lo * offline_peak), hi * offline_peak)
    target = min(max(target, before / cfg.max_change), before * cfg.max_change)
    state.peak = target
    state.n_accepted += 1
    logger.info(
        "lrscale: step %d%s: lambda_max=%.6g -> proposed %.6g, peak LR %.6g -> %.6g",
        step,
        "" if group is None else f" (param group {group})",
        est.lambda_max,
        proposed,
        before,
        target,
    )
    return Decision(step, group, est.lambda_max, True, None, proposed, before, target, est.n_matvec)


def crossed(prev_step: int, new_step: int, cfg: OnlineConfig, warmup_steps: int) -> bool:
    """Whether a measurement is due when the step moves from ``prev_step`` to ``new_step``.

    Due when a multiple of ``adapt_every`` or the start step (default: end of warmup) lies in
    ``(prev_step, new_step]`` and ``new_step >= start``. Works for increments of 1 (iterations) and of a
    batch size (Megatron-LM's samples).
    """
    start = warmup_steps if cfg.start_step is None else cfg.start_step
    if new_step <= prev_step or new_step < start:
        return False
    if prev_step < start <= new_step:
        return True
    return new_step // cfg.adapt_every > prev_step // cfg.adapt_every


def measure_lambda_max(
    model: Any,
    loss_fn: Callable[..., Any],
    batch: Any,
    *,
    params: Sequence[Any] | None = None,
    mode: str = "exact",
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    parallel: Any = None,
    optimizer: Any = None,
) -> Estimate:
    """The measure hook: top Hessian eigenvalue of ``loss_fn`` on ``batch`` by Lanczos.

    ``params`` restricts the Hessian to a subset of parameters (one param group in per-group mode).
    ``parallel`` is the job's :class:`~lrscale_megatron.parallel.ParallelContext`; ``None`` resolves it
    with :func:`lrscale_megatron.parallel.resolve_context` (megatron ``parallel_state`` when initialised,
    else plain data parallelism over the world, else one process). Every rank of the job must call this
    together: the products are collective. The curvature core is imported here, lazily, so the policy
    above never needs it. With ``optimizer`` the Adam-preconditioned operator is measured; an optimizer
    without per-parameter second moments gives a not-converged estimate with the reason.
    """
    from lrscale_megatron.curvature import HessianOperator, lanczos
    from lrscale_megatron.parallel import resolve_context

    ctx = parallel if parallel is not None else resolve_context(model)
    op: Any = HessianOperator(
        model, loss_fn, batch, mode=mode, params=None if params is None else list(params), parallel=ctx
    )
    if optimizer is not None:
        from lrscale_megatron.curvature import PreconditionedOperator

        try:
            op = PreconditionedOperator.from_optimizer(op, optimizer)
        except ValueError as e:
            return Estimate(lambda_max=math.nan, converged=False, reason=f"no Adam preconditioner: {e}")
    res = lanczos(op, k=1, max_iter=max_iter, tol=tol, seed=seed)
    lam = float(res.eigenvalues[0]) if len(res.eigenvalues) else math.nan
    return Estimate(
        lambda_max=lam,
        converged=bool(res.converged),
        reason=res.reason,
        n_matvec=int(res.n_matvec),
        residual=float(res.residuals[0]) if res.residuals else math.nan,
    )


def curvature_estimator(
    model: Any,
    loss_fn: Callable[..., Any],
    batch: Any,
    online: OnlineConfig,
    *,
    sync: bool = True,
    parallel: Any = None,
    optimizer: Any = None,
) -> Estimator:
    """The estimator a scheduler attaches: :func:`measure_lambda_max` with the online settings
    (preconditioned by ``optimizer`` when ``online.precondition``), and with ``sync`` rank 0's estimate
    broadcast so every rank applies the same LR."""

    def estimator(params: Sequence[Any] | None) -> Estimate:
        return measure_lambda_max(
            model,
            loss_fn,
            batch,
            params=params,
            mode=online.hvp,
            max_iter=online.max_iter,
            tol=online.tol,
            seed=online.seed,
            parallel=parallel,
            optimizer=optimizer if online.precondition else None,
        )

    return _broadcast_from_rank0(estimator) if sync else estimator


def _broadcast_from_rank0(estimator: Estimator) -> Estimator:
    def synced(params: Sequence[Any] | None) -> Estimate:
        import torch.distributed as dist

        est = estimator(params)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box: list[Any] = [est]
            dist.broadcast_object_list(box, src=0)
            est = box[0]
        return est

    return synced
