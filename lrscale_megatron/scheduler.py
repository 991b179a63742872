"""The LRScale scheduler: a pure schedule (:mod:`.schedule`) bound to an optimizer's param groups.

The pieces, one module each: the typed config (:mod:`.scheduler_config`: :class:`LRScaleConfig`,
:class:`ModelSizes`, :class:`OnlineConfig`), the offline peak (:mod:`.offline_peak`), the online policy
(:mod:`.adapter`), the state machine (:mod:`.lrscale_core`: step count, peak(s), measurements, checkpoint
state) and, here, the optimizer binding for DeepSpeed and plain PyTorch (:class:`LRScaleScheduler`); all
are importable from this module. The Megatron binding lives in :mod:`.integrations.megatron` and reuses
the same core.

Units: under DeepSpeed and plain PyTorch a step is one optimizer iteration (``scheduler.step()`` after
each ``optimizer.step()``). Under Megatron-LM a step is a *sample* (``step(increment=global_batch_size)``)
and ``warmup_steps``, ``total_steps`` and ``online.adapt_every`` are then counted in samples.

Plain PyTorch::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)        # lr only sets per-group ratios
    sched = LRScaleScheduler(opt, LRScaleConfig(peak_lr=3e-4, warmup_steps=100, total_steps=10_000))
    for batch in data:
        loss = model(batch); loss.backward(); opt.step(); opt.zero_grad(); sched.step()

Per-group LRs set by the user are kept as ratios (DeepSpeed issue #7713): a group created with
``lr=1e-4`` in an optimizer whose default ``lr`` is ``1e-3`` follows the schedule scaled by 0.1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrscale_megatron.adapter import Estimate
from lrscale_megatron.lrscale_core import STATE_FORMAT, LRScaleCore
from lrscale_megatron.offline_peak import _law_api, resolve_offline_peak
from lrscale_megatron.scheduler_config import LRScaleConfig, LRScaleConfigError, ModelSizes, OnlineConfig

if TYPE_CHECKING:
    from lrscale_megatron.monitor import LRScaleMonitor

logger = logging.getLogger(__name__)

__all__ = [
    "STATE_FORMAT",
    "LRScaleConfig",
    "LRScaleConfigError",
    "LRScaleCore",
    "LRScaleScheduler",
    "ModelSizes",
    "OnlineConfig",
    "_law_api",
    "resolve_offline_peak",
]


class LRScaleScheduler:
    """LR scheduler for DeepSpeed and plain PyTorch; one ``step()`` per optimizer iteration.

    ``optimizer`` is a ``torch.optim.Optimizer`` (or anything with ``param_groups``); under DeepSpeed
    the registered factory unwraps ZeRO/bf16 wrappers first. The LR of every group is set at
    construction (step 0) and after every ``step()``.
    """

    def __init__(
        self,
        optimizer: Any,
        config: LRScaleConfig,
        *,
        offline_peak: float | None = None,
        monitor: LRScaleMonitor | None = None,
    ) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} has no param_groups; pass a torch optimizer")
        self.optimizer = optimizer
        self.config = config
        self.core = LRScaleCore(config, _group_ratios(optimizer), offline_peak=offline_peak)
        self._apply()
        if monitor is not None:
            self.attach_monitor(monitor)

    # -- torch / DeepSpeed scheduler API
    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one iteration; or, DeepSpeed-style, to just after iteration ``last_batch_iteration``."""
        target = self.core.num_steps + 1 if last_batch_iteration is None else int(last_batch_iteration) + 1
        used = self.get_last_lr() if self.core.monitor is not None else None
        self.core.advance(target - self.core.num_steps)
        self._apply()
        if used is not None and self.core.monitor is not None:
            self.core.monitor.log_step(target - 1, used)

    def get_lr(self) -> list[float]:
        """Current LR of each param group."""
        return [self.core.lr(g) for g in range(len(self.optimizer.param_groups))]

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    @property
    def num_steps(self) -> int:
        """Iterations completed."""
        return self.core.num_steps

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's name: index of the last completed iteration (-1 before the first)."""
        return self.core.num_steps - 1

    @property
    def peak_lr(self) -> float:
        """Current (possibly adapted) peak LR of group 0."""
        return self.core.peak(0)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per curvature measurement (step, group, lambda_max, accepted, reason, peaks)."""
        return self.core.history

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore; raises ``ValueError`` naming both values if the config disagrees with the checkpoint."""
        self.core.load_state_dict(state_dict)
        self._apply()

    # -- curvature
    def attach_curvature(
        self,
        model: Any,
        loss_fn: Callable[..., Any],
        batch: Any,
        *,
        param_groups: Sequence[Sequence[Any]] | None = None,
        sync: bool = True,
        parallel: Any = None,
    ) -> None:
        """Give online mode what it measures: ``loss_fn(model, batch)`` at the current weights.

        ``batch`` is the held batch (the same on every data-parallel rank). ``param_groups`` lists the
        model parameters of each optimizer param group, in order, for ``online.per_group``; it defaults
        to the optimizer's own groups, which is right for plain PyTorch but not under ZeRO (where the
        optimizer holds flat partitions). With ``sync`` rank 0's estimate is broadcast to all ranks.
        ``parallel`` is the job's :class:`~lrscale_megatron.parallel.ParallelContext` (default: resolved
        from megatron ``parallel_state`` or the DDP world); every rank must keep calling ``step()``:
        the measurement is collective.
        """
        from lrscale_megatron.measurement import online_estimators

        # the DeepSpeed wrapper (ZeRO / bf16) is where v-hat lives; the inner torch optimizer otherwise
        optimizer = getattr(self, "host_optimizer", None) or self.optimizer
        estimator, warmup = online_estimators(
            model,
            loss_fn,
            batch,
            self.config.online,
            self.config.warmup_steps,
            sync=sync,
            parallel=parallel,
            optimizer=optimizer,
        )
        self.attach_estimator(estimator, param_groups, warmup_estimator=warmup)

    def attach_estimator(
        self,
        estimator: Callable[[Sequence[Any] | None], Estimate | float],
        param_groups: Sequence[Sequence[Any]] | None = None,
        *,
        warmup_estimator: Callable[[Sequence[Any] | None], Estimate | float] | None = None,
    ) -> None:
        """Inject a curvature estimator ``estimator(params_or_None) -> Estimate | lambda_max``
        (``warmup_estimator``: an optional cheaper one for the measurements during warmup)."""
        if param_groups is None and self.config.online.per_group:
            param_groups = [list(g["params"]) for g in self.optimizer.param_groups]
        self.core.set_estimator(estimator, param_groups, warmup_estimator=warmup_estimator)

    # -- monitoring
    def attach_monitor(self, monitor: LRScaleMonitor | None) -> None:
        """Report each iteration's LRs and each measurement to ``monitor`` (``None`` detaches).

        Not part of ``state_dict``: attach again after a restore.
        """
        self.core.monitor = monitor

    @property
    def monitor(self) -> LRScaleMonitor | None:
        return self.core.monitor

    def _apply(self) -> None:
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.core.lr(g)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LRScaleScheduler(peak_lr={self.core.offline_peak:.6g}, decay_style={c.decay_style}, "
            f"warmup_steps={c.warmup_steps}, total_steps={c.total_steps}, online={c.online.enabled})"
        )


def _group_ratios(optimizer: Any) -> list[float]:
    """Each group's LR relative to the optimizer's default LR (1.0 for groups that did not set one)."""
    groups = optimizer.param_groups
    ref = getattr(optimizer, "defaults", {}).get("lr")
    if not isinstance(ref, (int, float)) or isinstance(ref, bool) or not ref > 0:
        return [1.0] * len(groups)
    ratios = [float(g.get("lr", ref)) / float(ref) for g in groups]
    if any(r != 1.0 for r in ratios):
        logger.info(
            "lrscale: keeping per-group LR ratios %s (relative to the optimizer's lr=%g)", ratios, ref
        )
    return ratios
