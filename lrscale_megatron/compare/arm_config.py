"""The compare config's arm sections (how each arm gets its LR or optimizer settings) and the shared
model base of every compare-config section (:class:`CompareConfigError` names field, value and fix)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from lrscale_megatron.configs import ConfigError, ConfigModel


class CompareConfigError(ConfigError):
    """A bad compare-config value: names the field, the value, what is wrong and the fix."""


def _finite_positive(name: str, v: float | None, fix: str) -> None:
    if v is not None and not (math.isfinite(v) and v > 0):
        raise CompareConfigError(name, v, "must be a finite number > 0", fix)


class _Model(ConfigModel):
    error_class = CompareConfigError


class LRScaleArmConfig(_Model):
    """How the LRScale arms get their peak."""

    law: str | None = "steplaw-dense"
    """Shipped law name or law-file path (e.g. ``lrscale tune``'s ``law.json``); the peak is
    ``lrscale_megatron.law.predict`` for the model's non-embedding parameters, the run's tokens and the
    batch tokens. Exclusive with ``peak_lr``."""
    peak_lr: float | None = None
    """An explicit offline peak instead of a law."""
    decay_style: str = "cosine"
    """LRScale decay for both LRScale arms and ``steplaw_formula`` (``cosine`` | ``inverse_sqrt`` | ``wsd``
    | ``constant`` | ``linear``)."""
    online: dict[str, Any] = Field(default_factory=dict)
    """The ``online`` block of the scheduler params for ``lrscale_online``
    (:class:`lrscale_megatron.adapter.OnlineConfig`; ``enabled`` is forced to true)."""

    @model_validator(mode="after")
    def _check(self) -> LRScaleArmConfig:
        if (self.law is None) == (self.peak_lr is None):
            raise CompareConfigError(
                "law", self.law, f"give exactly one of law and peak_lr (peak_lr={self.peak_lr})", "keep one"
            )
        _finite_positive("peak_lr", self.peak_lr, "give a peak LR or use law")
        from lrscale_megatron.schedule import DECAY_STYLES

        if self.decay_style not in DECAY_STYLES:
            raise CompareConfigError(
                "decay_style", self.decay_style, "unknown decay style", f"use one of {DECAY_STYLES}"
            )
        return self


class SteplawArmConfig(_Model):
    """The ``steplaw_formula`` arm: LRScale's schedule at a published law's peak (no fit of ours)."""

    law: str = "steplaw-published"
    """The published law (Li et al. 2025, Step Law: ``1.79 N^-0.713 D^0.307``) or another law file."""


class ScheduleFreeArmConfig(_Model):
    """``schedulefree``: Schedule-Free AdamW (Defazio et al. 2024, ``schedulefree`` package) at its authors'
    recommended settings (facebookresearch/schedule_free README): no LR schedule, warmup through the
    optimizer's ``warmup_steps`` (= ``training.warmup_steps``), ``beta1`` 0.9; betas, eps and weight
    decay are the train config's AdamW values (the same as every other arm)."""

    lr: float = 0.0025
    """The package's default LR; the README advises 1x-10x the schedule-based AdamW LR (here 4.2x the
    copied 6e-4)."""

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        _finite_positive("lr", v, "use the package default 0.0025")
        return v


class ProdigyArmConfig(_Model):
    """``prodigy``: Prodigy (Mishchenko & Defazio 2024, ``prodigyopt``) at its authors' recommended
    settings (konstmish/prodigy README): ``lr=1.0`` under cosine annealing to 0 over the run,
    ``safeguard_warmup=True`` with linear warmup, ``use_bias_correction=True``; betas, eps and
    decoupled weight decay are the train config's AdamW values."""

    lr: float = 1.0
    """Prodigy's LR multiplier (the README: "we recommend using lr=1. for all networks")."""
    d_coef: float = 1.0
    """Scale of the estimated step size (README default 1.0)."""
    safeguard_warmup: bool = True
    """README: set when a linear warmup is used (every arm here warms up)."""
    use_bias_correction: bool = True
    """README: recommended with ``safeguard_warmup``."""

    @model_validator(mode="after")
    def _check(self) -> ProdigyArmConfig:
        _finite_positive("lr", self.lr, "use 1.0 (the authors' recommendation)")
        _finite_positive("d_coef", self.d_coef, "use 1.0")
        return self


__all__ = [
    "CompareConfigError",
    "LRScaleArmConfig",
    "ProdigyArmConfig",
    "ScheduleFreeArmConfig",
    "SteplawArmConfig",
]
