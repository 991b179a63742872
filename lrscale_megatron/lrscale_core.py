"""LRScaleCore: the scheduler's state machine, independent of any optimizer or host framework.

Step count, the peak(s), when to measure curvature and what the policy (:mod:`lrscale_megatron.adapter`)
did with each measurement, and the checkpoint state. :class:`~lrscale_megatron.scheduler.LRScaleScheduler`
(DeepSpeed / PyTorch) and :class:`~lrscale_megatron.integrations.megatron.LRScaleParamScheduler` bind it
to an optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrscale_megatron.adapter import AdapterState, Decision, Estimate, Estimator, adapt, crossed
from lrscale_megatron.offline_peak import resolve_offline_peak
from lrscale_megatron.schedule import lr_at
from lrscale_megatron.scheduler_config import LRScaleConfig

if TYPE_CHECKING:
    from lrscale_megatron.monitor import LRScaleMonitor

#: Version of :meth:`LRScaleCore.state_dict` (2: gauge policy state).
STATE_FORMAT = 2


def _as_estimate(x: Estimate | float) -> Estimate:
    return x if isinstance(x, Estimate) else Estimate(lambda_max=float(x))


class LRScaleCore:
    """Step count, peak(s) and online adaptation, independent of any optimizer.

    ``group_ratios[g]`` scales group ``g``'s offline peak (user per-group LRs). In global mode one
    adapted peak drives every group (times its ratio) and its gauge reads the LR of a ratio-1 group; with
    ``online.per_group`` each group has its own peak and gauge.
    """

    def __init__(
        self, config: LRScaleConfig, group_ratios: Sequence[float], offline_peak: float | None = None
    ):
        self.config = config
        self.offline_peak = resolve_offline_peak(config) if offline_peak is None else float(offline_peak)
        self.group_ratios = [float(r) for r in group_ratios]
        self.reference_peaks = [
            self.offline_peak if r == 1.0 else self.offline_peak * r for r in self.group_ratios
        ]
        n = len(self.group_ratios) if config.online.per_group else 1
        refs = self.reference_peaks if config.online.per_group else [self.offline_peak]
        self.states = [AdapterState(peak=p) for p in refs[:n]]
        self.num_steps = 0
        self.history: list[dict[str, Any]] = []
        self._estimator: Estimator | None = None
        self._warmup_estimator: Estimator | None = None
        self._group_params: Sequence[Sequence[Any]] | None = None
        #: where each measurement is reported (:class:`~lrscale_megatron.monitor.LRScaleMonitor`); not state.
        self.monitor: LRScaleMonitor | None = None

    # -- peaks and LRs
    def peak(self, group: int) -> float:
        """Current peak LR of param group ``group``."""
        if self.config.online.per_group:
            return self.states[group].peak
        p = self.states[0].peak
        ref = self.reference_peaks[group]
        if ref == self.offline_peak:
            return p
        return ref if p == self.offline_peak else ref * (p / self.offline_peak)

    def schedule_scale(self, group: int) -> float:
        """Adapted peak / offline peak of ``group`` (1.0 until online mode moves it). An adaptation scales
        the whole schedule, ``lr(t) = f(t) * peak``: ``min_lr`` and ``init_lr`` scale with the peak."""
        return self.peak(group) / self.reference_peaks[group]

    def _lr_for(self, peak: float, scale: float, step: int) -> float:
        """``scale`` multiplies ``min_lr`` and ``init_lr`` (user group ratio x adaptation; 1.0 exact)."""
        c = self.config
        return lr_at(
            step,
            peak_lr=peak,
            min_lr=c.min_lr if scale == 1.0 else c.min_lr * scale,
            init_lr=c.init_lr if scale == 1.0 else c.init_lr * scale,
            warmup_steps=c.warmup_steps,
            total_steps=c.total_steps,
            decay_style=c.decay_style,
            wsd_decay_steps=c.wsd_decay_steps,
            wsd_decay_shape=c.wsd_decay_shape,
        )

    def lr(self, group: int, step: int | None = None) -> float:
        """LR of group ``group`` at ``step`` (default: now) under the current peak."""
        scale = self.group_ratios[group] * self.schedule_scale(group)
        return self._lr_for(self.peak(group), scale, self.num_steps if step is None else step)

    def lr_in_force(self, state_index: int) -> float:
        """The LR the gauge of ``states[state_index]`` reads: its group's LR now (global mode: ratio 1)."""
        if self.config.online.per_group:
            return self.lr(state_index)
        p = self.states[0].peak
        return self._lr_for(p, p / self.offline_peak, self.num_steps)

    # -- online adaptation
    def set_estimator(
        self,
        estimator: Callable[[Sequence[Any] | None], Estimate | float],
        group_params: Sequence[Sequence[Any]] | None = None,
        warmup_estimator: Callable[[Sequence[Any] | None], Estimate | float] | None = None,
    ) -> None:
        """Attach the curvature source; ``warmup_estimator`` (optional, cheaper) measures during warmup."""
        if (
            self.config.online.per_group
            and group_params is not None
            and len(group_params) != len(self.states)
        ):
            raise ValueError(
                f"param_groups has {len(group_params)} entries but the optimizer has "
                f"{len(self.states)} param groups; pass one parameter list per group, in order"
            )
        self._estimator = lambda params: _as_estimate(estimator(params))
        w = warmup_estimator
        self._warmup_estimator = None if w is None else (lambda params: _as_estimate(w(params)))
        self._group_params = group_params

    def advance(self, increment: int) -> None:
        """Move ``increment`` steps forward, measuring curvature when a measurement point is crossed."""
        if increment < 0:
            raise ValueError(f"increment={increment}: the scheduler cannot step backwards")
        prev = self.num_steps
        self.num_steps += increment
        on = self.config.online
        due = crossed(prev, self.num_steps, on, self.config.warmup_steps)
        if on.enabled and (due or any(st.confirm_pending for st in self.states)):
            self.adapt_now()

    def adapt_now(self) -> None:
        """Measure and update the peak(s) at the current step."""
        if self._estimator is None:
            raise RuntimeError(
                "LRScale online mode is enabled but no curvature source is attached. Fix: call "
                "scheduler.attach_curvature(model, loss_fn, batch) (DeepSpeed: engine.lr_scheduler) "
                "before training, or set online.enabled=false."
            )
        on = self.config.online
        warmup_done = self.num_steps >= self.config.warmup_steps
        measure = self._estimator if warmup_done or self._warmup_estimator is None else self._warmup_estimator
        if on.per_group and self._group_params is None:
            raise RuntimeError(
                "LRScale per-group mode needs the parameters of each group: "
                "attach_curvature(..., param_groups=[[...], ...])"
            )
        measured: list[tuple[Decision, Estimate]] = []  # per measured group
        for i, st in enumerate(self.states):
            params = self._group_params[i] if on.per_group and self._group_params is not None else None
            est = measure(params)
            d = adapt(
                st,
                est,
                offline_peak=self.reference_peaks[i] if on.per_group else self.offline_peak,
                cfg=on,
                step=self.num_steps,
                group=i if on.per_group else None,
                lr=self.lr_in_force(i),
                warmup_done=warmup_done,
            )
            measured.append((d, est))
        self.history.extend(d.to_dict() for d, _ in measured)
        if self.monitor is not None:
            for d, est in measured:
                self.monitor.log_measurement(d, est)

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "num_steps": self.num_steps,
            "offline_peak": self.offline_peak,
            "group_ratios": list(self.group_ratios),
            "states": [dataclasses.asdict(s) for s in self.states],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(
                f"LRScale checkpoint format {sd.get('format')!r} != supported {STATE_FORMAT}; "
                "start a fresh schedule (the online policy state changed with format 2)"
            )
        _compare("", sd["config"], self.config.to_dict())
        for key, mine in (("offline_peak", self.offline_peak), ("group_ratios", self.group_ratios)):
            if sd[key] != mine:
                raise ValueError(
                    f"LRScale checkpoint has {key}={sd[key]!r} but this run has {key}={mine!r}; "
                    "restore the same law/peak and optimizer param groups, or start a fresh schedule"
                )
        self.num_steps = int(sd["num_steps"])
        self.states = [AdapterState(**s) for s in sd["states"]]
        self.history = [dict(h) for h in sd["history"]]


def _compare(prefix: str, ckpt: Any, mine: Any) -> None:
    """Raise naming both values at the first config field where checkpoint and run disagree."""
    if isinstance(ckpt, dict) and isinstance(mine, dict):
        for k in sorted(set(ckpt) | set(mine)):
            _compare(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", ckpt.get(k), mine.get(k))
        return
    if ckpt != mine:
        raise ValueError(
            f"LRScale config mismatch: checkpoint has {prefix}={ckpt!r} but this run has "
            f"{prefix}={mine!r}. Fix: restore {prefix}={ckpt!r} to continue this run, or start "
            "a fresh schedule without loading the scheduler state"
        )
