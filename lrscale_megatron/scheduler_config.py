"""The LRScale scheduler's typed config: pydantic v2 models on the shared :mod:`lrscale_megatron.configs` base.

``LRScaleConfig`` is the ``params`` of ``"scheduler": {"type": "LRScale"}`` in a DeepSpeed JSON; ``model``
(:class:`ModelSizes`) feeds the law and ``online`` (:class:`OnlineConfig`) the spectral adaptation. Every
error is an :class:`LRScaleConfigError` naming the field path, the value, what is wrong and the fix, both
from :meth:`LRScaleConfig.from_dict` (JSON) and from direct construction (``LRScaleConfig(peak_lr=...)``).
Steps are iterations (DeepSpeed / PyTorch) or samples (Megatron-LM), see :mod:`lrscale_megatron.scheduler`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from lrscale_megatron.configs.base import did_you_mean
from lrscale_megatron.online_config import (
    Combine,
    CurvaturePeakMode,
    HvpMode,
    LRScaleConfigError,
    OnlineConfig,
    Rule,
    _finite,
    _Model,
)
from lrscale_megatron.schedule import WSD_DECAY_SHAPES, DecayStyle


class ModelSizes(_Model):
    """The run's sizes fed to the law (the ``model`` block of the scheduler params)."""

    params: float
    """Number of (non-embedding) parameters, as the law was fitted."""
    tokens: float
    """Training tokens of the whole run."""
    batch_tokens: float
    """Tokens per optimizer step (global batch size x sequence length)."""
    width: int | None = None
    """Hidden size, for laws with a width term."""
    depth: int | None = None
    """Number of layers, for laws with a depth term."""

    @field_validator("params", "tokens", "batch_tokens")
    @classmethod
    def _positive(cls, v: float, info: Any) -> float:
        return _finite(
            info.field_name, v, lo=0.0, fix=f"give the run's {info.field_name} as a positive number"
        )

    @field_validator("width", "depth")
    @classmethod
    def _positive_int(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v <= 0:
            raise LRScaleConfigError(
                info.field_name, v, "must be a positive integer", f"give the model's {info.field_name}"
            )
        return v


class LRScaleConfig(_Model):
    """Scheduler settings (the ``params`` of ``"scheduler": {"type": "LRScale"}``).

    Give the peak LR either explicitly (``peak_lr``) or from a fitted law (``law`` + ``model``).
    """

    total_steps: int = Field(
        json_schema_extra={"fix": "set the step at which decay ends (e.g. the run's total iterations)"}
    )
    """Step at which decay ends (warmup included); afterwards the LR is ``min_lr``."""
    peak_lr: float | None = None
    """Explicit peak LR (exclusive with ``law``)."""
    min_lr: float = 0.0
    """Floor of the decay."""
    init_lr: float = 0.0
    """LR at step 0, from which warmup rises linearly."""
    warmup_steps: int = 0
    """Steps of linear warmup (< ``total_steps``)."""
    decay_style: DecayStyle = "cosine"
    """``cosine`` | ``linear`` | ``inverse_sqrt`` | ``wsd`` | ``constant``."""
    wsd_decay_fraction: float = 0.2
    """For ``wsd``: fraction of ``total_steps`` spent in the final decay."""
    wsd_decay_shape: str = "linear"  # str (checked below): Megatron-LM's argparse passes a plain str
    """For ``wsd``: ``linear`` | ``cosine`` | ``exponential`` | ``minus_sqrt``."""
    law: str | None = None
    """Preset name or path of a law file (resolved by ``lrscale_megatron.law.predict``)."""
    model: ModelSizes | None = None
    """The run's sizes for the law."""
    online: OnlineConfig = OnlineConfig()
    """Online spectral adaptation."""

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], where: str = "scheduler.params") -> LRScaleConfig:  # type: ignore[override]
        """Build from a JSON-like mapping (DeepSpeed ``scheduler.params``); errors name ``where.field``."""
        return super().from_dict(params, where)  # type: ignore[no-any-return]

    @field_validator("total_steps", "warmup_steps")
    @classmethod
    def _steps(cls, v: int, info: Any) -> int:
        if info.field_name == "total_steps" and v <= 0:
            fix = "set the step at which decay ends (e.g. the run's total iterations)"
            raise LRScaleConfigError("total_steps", v, "must be > 0", fix)
        if v < 0:
            raise LRScaleConfigError(info.field_name, v, "must be >= 0", "use 0 for no warmup")
        return v

    @field_validator("peak_lr")
    @classmethod
    def _peak(cls, v: float | None) -> float | None:
        if v is not None:
            _finite("peak_lr", v, lo=0.0, fix="use a positive learning rate such as 3e-4")
        return v

    @field_validator("min_lr", "init_lr")
    @classmethod
    def _floor(cls, v: float, info: Any) -> float:
        return _finite(
            info.field_name, v, lo=0.0, lo_open=False, fix="use 0.0 or a positive value <= peak_lr"
        )

    @field_validator("wsd_decay_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not (0.0 < v <= 1.0) or not math.isfinite(v):
            raise LRScaleConfigError(
                "wsd_decay_fraction",
                v,
                "must be in (0, 1]",
                "use e.g. 0.2 (decay over the last 20% of total_steps)",
            )
        return v

    @field_validator("wsd_decay_shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        if v not in WSD_DECAY_SHAPES:
            fix = f"use one of {', '.join(WSD_DECAY_SHAPES)}{did_you_mean(v, WSD_DECAY_SHAPES)}"
            raise LRScaleConfigError("wsd_decay_shape", v, "unknown WSD decay shape", fix)
        return v

    @field_validator("law")
    @classmethod
    def _law(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise LRScaleConfigError("law", v, "is empty", "give a preset name or a law-file path")
        return v

    @model_validator(mode="after")
    def _cross(self) -> LRScaleConfig:
        if self.warmup_steps >= self.total_steps:
            raise LRScaleConfigError(
                "warmup_steps",
                self.warmup_steps,
                f"must be < total_steps ({self.total_steps})",
                "shorten the warmup or raise total_steps",
            )
        if self.peak_lr is None and self.law is None:
            raise LRScaleConfigError(
                "peak_lr",
                None,
                "no peak LR: neither peak_lr nor law is given",
                "set peak_lr, or law (preset name or law-file path) with model sizes",
            )
        if self.peak_lr is not None and self.law is not None:
            raise LRScaleConfigError(
                "law",
                self.law,
                f"given together with peak_lr={self.peak_lr!r}",
                "keep exactly one of peak_lr and law",
            )
        if self.law is not None and self.model is None:
            raise LRScaleConfigError(
                "model",
                None,
                "is required with law",
                "add model: {params, tokens, batch_tokens[, width, depth]}",
            )
        if self.peak_lr is not None:
            for name in ("min_lr", "init_lr"):
                if getattr(self, name) > self.peak_lr:
                    raise LRScaleConfigError(
                        name,
                        getattr(self, name),
                        f"exceeds peak_lr ({self.peak_lr})",
                        f"make {name} <= peak_lr",
                    )
        if self.decay_style == "wsd":
            n = self.wsd_decay_steps
            if n < 1 or n > self.total_steps - self.warmup_steps:
                raise LRScaleConfigError(
                    "wsd_decay_fraction",
                    self.wsd_decay_fraction,
                    f"gives {n} decay steps, outside [1, total_steps - warmup_steps = "
                    f"{self.total_steps - self.warmup_steps}]",
                    "pick a fraction whose decay fits after the warmup",
                )
        return self

    @property
    def wsd_decay_steps(self) -> int:
        """Length of the WSD decay phase in steps: ``round(wsd_decay_fraction * total_steps)``."""
        return int(round(self.wsd_decay_fraction * self.total_steps))


__all__ = [
    "Combine",
    "CurvaturePeakMode",
    "HvpMode",
    "LRScaleConfig",
    "LRScaleConfigError",
    "ModelSizes",
    "OnlineConfig",
    "Rule",
]
