"""An optax schedule equal, step for step, to the LRScale scheduler's offline schedule.

The PyTorch/DeepSpeed scheduler (:class:`lrscale_megatron.scheduler.LRScaleScheduler`) sets the LR of
optimizer update ``k`` (0-based) to ``LRScaleCore.lr(0, k)``: warmup from ``init_lr`` then cosine /
linear / inverse-sqrt / WSD / constant decay (:func:`lrscale_megatron.schedule.lr_at`). An optax
schedule is called with the update count ``k`` (0 for the first update), so the two agree when the
optax schedule returns that same number for every ``k``.

It does, exactly: the schedule is the table ``[LRScaleCore.lr(0, k) for k in 0..total_steps+1]``
computed in Python float64 by the *same* code as the torch scheduler, and ``schedule(count)`` indexes
it with ``count`` clipped to ``[0, total_steps + 1]`` (after ``total_steps`` the LR is constant:
``min_lr``, or the peak for ``decay_style="constant"``). Under ``jax_enable_x64`` the values are those
float64 numbers bit for bit; without it, their float32 roundings (what a float32 optimizer applies).
A formula re-evaluated in float32 inside ``jit`` would differ from the torch LR in the last bits.

The peak comes from an explicit number, a law :class:`~lrscale_megatron.law.predict.Prediction`, or
``law=`` + ``model=`` as in the DeepSpeed config (resolved by the same code as the torch scheduler).
The online adaptation (``online.enabled``) changes the schedule during training from curvature
measurements; it exists for the PyTorch schedulers only and is refused here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrscale_megatron.law.predict import Prediction
from lrscale_megatron.lrscale_core import LRScaleCore
from lrscale_megatron.scheduler_config import LRScaleConfig, LRScaleConfigError

logger = logging.getLogger(__name__)

#: Longest table built without complaint (entries; 8 bytes each in float64).
MAX_TABLE = 50_000_000


class TableSchedule:
    """``count -> LR`` for optax (``optax.adamw(learning_rate=schedule)``); jittable.

    Attributes:
        config: the validated :class:`LRScaleConfig` the schedule was built from.
        peak_lr: the peak LR in force (explicit, or the law's prediction).
        values: float64 numpy table, ``values[k]`` the LR of update ``k`` for ``k <= total_steps + 1``.
    """

    def __init__(self, config: LRScaleConfig, peak_lr: float, values: np.ndarray) -> None:
        self.config = config
        self.peak_lr = peak_lr
        self.values = values
        self._table = jnp.asarray(values, dtype=jnp.result_type(float))  # float64 under x64, else float32

    def __call__(self, count: Any) -> jax.Array:
        i = jnp.clip(jnp.asarray(count), 0, self.values.shape[0] - 1)
        return self._table[i]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TableSchedule(peak_lr={self.peak_lr:.6g}, decay_style={c.decay_style!r}, "
            f"warmup_steps={c.warmup_steps}, total_steps={c.total_steps})"
        )


def _config(peak: Prediction | float | LRScaleConfig | None, params: Mapping[str, Any]) -> LRScaleConfig:
    if isinstance(peak, LRScaleConfig):
        if params:
            raise TypeError(
                f"optax_schedule: got an LRScaleConfig and keyword settings {sorted(params)}; fix: put "
                "the settings in the config (config.model_copy(update={...}))"
            )
        return peak
    if peak is None:
        return LRScaleConfig.from_dict(dict(params), where="optax_schedule")
    if "peak_lr" in params or "law" in params:
        raise TypeError(
            "optax_schedule: the peak is given positionally and again as peak_lr/law; fix: give it once"
        )
    value = peak.peak_lr if isinstance(peak, Prediction) else peak
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"optax_schedule: peak={peak!r} is not a Prediction, a number or an LRScaleConfig; fix: pass "
            "lrscale_megatron.law.predict.predict(...)'s result or a positive float"
        )
    return LRScaleConfig.from_dict({"peak_lr": float(value), **params}, where="optax_schedule")


def optax_schedule(peak: Prediction | float | LRScaleConfig | None = None, /, **params: Any) -> TableSchedule:
    """The LRScale offline schedule as an optax schedule (see the module docstring for the equality).

    Args:
        peak: a law :class:`Prediction` (its ``peak_lr``), an explicit peak LR, or a whole
            :class:`LRScaleConfig`; omit it to give ``law=`` and ``model=`` in ``params``.
        **params: :class:`LRScaleConfig` fields (the DeepSpeed ``scheduler.params``): ``total_steps``
            (required), ``warmup_steps``, ``min_lr``, ``init_lr``, ``decay_style``, ``wsd_decay_fraction``,
            ``wsd_decay_shape``, or ``law`` + ``model``. Steps are optimizer updates. Errors name the field.

    Example::

        sched = optax_schedule(predict(load_law("steplaw-dense"), params=1.2e8, tokens=2.5e9,
                                       batch_tokens=524288), total_steps=4768, warmup_steps=200)
        opt = optax.adamw(learning_rate=sched)
    """
    config = _config(peak, params)
    if config.online.enabled:
        raise LRScaleConfigError(
            "online.enabled",
            True,
            "online adaptation changes the LR from curvature measurements during training; an optax "
            "schedule is a fixed function of the step",
            "set online.enabled=false here (the online policy is available with the PyTorch schedulers)",
        )
    n = config.total_steps + 2
    if n > MAX_TABLE:
        raise LRScaleConfigError(
            "total_steps",
            config.total_steps,
            f"needs a table of {n} LRs (more than {MAX_TABLE})",
            "count total_steps in optimizer updates, not samples or tokens",
        )
    core = LRScaleCore(config, [1.0])
    values = np.array([core.lr(0, k) for k in range(n)], dtype=np.float64)
    logger.info(
        "lrscale: optax schedule, peak LR %.6g, %s decay over %d steps",
        core.offline_peak,
        config.decay_style,
        config.total_steps,
    )
    return TableSchedule(config, core.offline_peak, values)
