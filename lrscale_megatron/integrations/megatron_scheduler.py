"""megatron-core ``OptimizerParamScheduler`` driven by an LRScale schedule (see
:mod:`lrscale_megatron.integrations.megatron` for the whole Megatron integration and its launch commands).

**Units: ``num_steps`` counts what ``step(increment)`` is given. Megatron-LM's training loop passes
``increment = global_batch_size`` (samples), so ``warmup_steps``, ``total_steps`` and
``online.adapt_every`` are in samples.** Curvature is attached through
:func:`lrscale_megatron.measurement.curvature_estimator`: Adam's second moment is read from megatron's
distributed / float16 / chained optimizers, and settings that cannot be measured are refused when attached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lrscale_megatron.adapter import Estimate
from lrscale_megatron.integrations.megatron_args import DECAY_STYLE_NAME
from lrscale_megatron.measurement import online_estimators
from lrscale_megatron.schedule import lr_at
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleCore

logger = logging.getLogger(__name__)


class LRScaleParamScheduler(OptimizerParamScheduler):
    """megatron-core ``OptimizerParamScheduler`` driven by an LRScale schedule.

    ``num_steps`` is in the caller's unit (samples under Megatron-LM). Every group's LR is
    ``lr_at(num_steps)`` with peak ``param_group.get("max_lr", peak) * online_factor`` (or its own
    adapted peak with ``online.per_group``) and floor ``param_group.get("min_lr", min_lr)``.
    """

    def __init__(
        self,
        optimizer: Any,
        config: LRScaleConfig,
        *,
        start_wd: float = 0.0,
        end_wd: float = 0.0,
        wd_incr_steps: int | None = None,
        wd_incr_style: str = "constant",
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
        offline_peak: float | None = None,
    ) -> None:
        self.lrscale_config = config
        self._loading = False
        core = LRScaleCore(config, [1.0], offline_peak=offline_peak)  # resolves the peak once
        peak = core.offline_peak
        ratios = [1.0 if "max_lr" not in g else float(g["max_lr"]) / peak for g in optimizer.param_groups]
        self.lrscale = LRScaleCore(config, ratios, offline_peak=peak)
        super().__init__(
            optimizer,
            init_lr=config.init_lr,
            max_lr=peak,
            min_lr=config.min_lr,
            lr_warmup_steps=config.warmup_steps,
            lr_decay_steps=config.total_steps,
            lr_decay_style=DECAY_STYLE_NAME,
            start_wd=start_wd,
            end_wd=end_wd,
            wd_incr_steps=config.total_steps if wd_incr_steps is None else wd_incr_steps,
            wd_incr_style=wd_incr_style,
            use_checkpoint_opt_param_scheduler=use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=override_opt_param_scheduler,
        )

    def get_lr(self, param_group: dict) -> float:
        """LR of ``param_group`` at ``self.num_steps`` (samples under Megatron-LM)."""
        c = self.lrscale_config
        group = self._group_index(param_group)
        peak = self.lrscale.peak(group)
        # an adaptation scales the whole schedule (as the DeepSpeed / PyTorch binding does)
        scale = self.lrscale.schedule_scale(group)
        min_lr = cast(float, param_group.get("min_lr", self.min_lr)) * scale
        return lr_at(
            self.num_steps,
            peak_lr=peak,
            min_lr=min_lr,
            init_lr=self.init_lr * scale,
            warmup_steps=self.lr_warmup_steps,
            total_steps=self.lr_decay_steps,
            decay_style=c.decay_style,
            wsd_decay_steps=c.wsd_decay_steps,
            wsd_decay_shape=c.wsd_decay_shape,
        )

    def step(self, increment: int) -> None:
        """Advance ``increment`` units (samples under Megatron-LM), measuring curvature when due."""
        if not self._loading:
            self.lrscale.advance(increment)
        super().step(increment)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lrscale"] = self.lrscale.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore; the LRScale part raises ``ValueError`` naming both values on a config mismatch."""
        self.lrscale.load_state_dict(state_dict["lrscale"])
        self._loading = True
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = False

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
        """Same as :meth:`LRScaleScheduler.attach_curvature`; ``param_groups`` is required for per-group
        mode (a ``MegatronOptimizer`` holds main-parameter copies, not the model's parameters)."""
        estimator, warmup = online_estimators(
            model,
            loss_fn,
            batch,
            self.lrscale_config.online,
            self.lrscale_config.warmup_steps,
            sync=sync,
            parallel=parallel,
            optimizer=self.optimizer,
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
        self.lrscale.set_estimator(estimator, param_groups, warmup_estimator=warmup_estimator)

    def _group_index(self, param_group: dict) -> int:
        for i, g in enumerate(self.optimizer.param_groups):
            if g is param_group:
                return i
        raise ValueError("get_lr() was given a param_group that is not one of this optimizer's groups")
