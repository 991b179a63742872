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
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lrscale_megatron.configs.base import ConfigError, ConfigModel, did_you_mean
from lrscale_megatron.schedule import WSD_DECAY_SHAPES, DecayStyle

Rule = Literal["eos", "inverse"]
Combine = Literal["min", "max", "geomean", "online"]
HvpMode = Literal["exact", "fd"]
CurvaturePeakMode = Literal["max", "curv"]


class LRScaleConfigError(ConfigError):
    """A bad scheduler setting: names the field, the value, what is wrong and how to fix it."""


def _finite(name: str, v: float, *, lo: float, lo_open: bool = True, fix: str) -> float:
    """``v`` if finite and above ``lo`` (strictly when ``lo_open``), else an error naming ``name``."""
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo)):
        raise LRScaleConfigError(name, v, f"must be a finite number {'>' if lo_open else '>='} {lo:g}", fix)
    return v


class _Model(ConfigModel):
    """Scheduler models: direct construction reports errors like :meth:`from_dict` does."""

    error_class = LRScaleConfigError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise type(self)._translate(e, "") from None


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


class OnlineConfig(_Model):
    """Online spectral adaptation (the ``online`` block of the scheduler params).

    The policy (:mod:`lrscale_megatron.adapter`) reads each measurement as the gauge
    ``g = lambda_max * lr(t) / threshold`` against the LR in force at step ``t`` (``threshold`` =
    ``(2 + 2 beta1) / (1 - beta1)`` for ``rule="eos"``, ``eta_base`` for ``rule="inverse"``; ``g`` ~ 1 at
    the edge of stability) and holds while ``g <= cut_above``, cuts the peak so that ``g`` becomes
    ``safety`` when ``g > cut_above``, and, where ``combine`` lets the peak rise, raises it (at most
    ``max_change`` per measurement, after warmup) when the smoothed ``g`` is below ``raise_below``.
    """

    enabled: bool = False
    """Adapt the peak from measured curvature. Off by default."""
    adapt_every: int = 1000
    """Measure every this many steps (a multiple crossed, in samples, under Megatron-LM). With ``hvp="fd"``
    a measurement costs about one gradient per Lanczos iteration (~10): ~1 % overhead at 1000."""
    warmup_checks: int = 2
    """Measurements at ``k * warmup_steps / warmup_checks`` (k = 1..n): a too-high peak is caught before it
    has cost the run. 0: none before ``adapt_every``."""
    start_step: int | None = None
    """No measurement before this step; when given, one is due at it. ``None``: from the first warmup check."""
    rule: Rule = "eos"
    """``eos``: threshold ``(2 + 2 beta1) / (1 - beta1)`` (Cohen et al. 2022, Adam-preconditioned
    sharpness); ``inverse``: threshold ``eta_base`` (``eta = eta_base / lambda``, the seed's layer-wise
    scheme)."""
    beta1: float = 0.9
    """Adam's beta1 in the ``eos`` threshold."""
    safety: float = 0.5
    """Gauge after a cut, and the gauge a raise aims at, in (0, 1]."""
    cut_above: float = 2.0
    """Cut when the gauge exceeds this (> 1: under Adam, g ~ 1 is healthy training at the edge)."""
    raise_below: float = 0.25
    """Raise (only where ``combine`` allows) when the smoothed gauge is below this (< ``safety``)."""
    eta_base: float = 1.0
    """Threshold of the ``inverse`` rule."""
    ema: float = 0.5
    """Weight of the previous smoothed log-gauge for raising decisions (0: none; cuts use the raw gauge)."""
    combine: Combine = "min"
    """Whether the peak may rise above the offline (law / explicit) peak: ``min`` (default): never;
    ``max`` / ``online``: up to ``band`` high; ``geomean``: also, by half of each proposed raise (in log)."""
    band: tuple[float, float] = Field(
        default=(0.01, 10.0),
        strict=False,
        json_schema_extra={"fix": "use e.g. [0.01, 10.0] (multiples of the offline peak)"},
    )
    """``(low, high)`` multipliers of the offline peak that bound the adapted peak."""
    max_change: float = 2.0
    """Largest factor (> 1) by which one measurement may raise the peak."""
    confirm_cuts: bool = True
    """After a measurement at ``g <= 1``, a sample above ``cut_above`` is re-measured at the next step first."""
    max_cut: float = 10.0
    """Largest factor (> 1) by which one measurement may cut the peak."""
    per_group: bool = False
    """Each optimizer param group gets its own measurement, gauge and peak (per-layer: a group per layer)."""
    hvp: HvpMode = "fd"
    """Hessian-vector products: ``fd`` (forward finite differences with a cached base gradient, one
    gradient per product) or ``exact`` (double backward)."""
    precondition: bool = True
    """Measure the Adam-preconditioned Hessian ``P^-1/2 H P^-1/2``, the quantity the ``eos`` threshold is
    stated for; ``False``: the raw Hessian (pair it with ``rule="inverse"``)."""
    max_iter: int = 20
    """Lanczos iterations per measurement."""
    tol: float = 1e-2
    """Lanczos relative residual tolerance after warmup (bounds the eigenvalue's relative error: 1 % is
    ample for a gauge compared with ``cut_above``, and a tighter one leaves many estimates unconverged)."""
    warmup_tol: float = 3e-2
    """Lanczos tolerance during warmup (cheaper first measurements)."""
    seed: int = 0
    """Lanczos start-vector seed (fixed: identical estimates on every rank and on resume)."""
    kappa: float | None = None
    """Curvature predictor ``eta_curv = kappa / lambda`` (kappa from a proxy ladder,
    :func:`lrscale_megatron.curvature_peak.calibrate_kappa`), applied once, at the first measurement at
    or after the end of warmup. ``None``: off."""
    curvature_peak: CurvaturePeakMode = "max"
    """With ``kappa``: ``max`` sets the peak to ``max(offline peak, eta_curv)`` (the seed's combined
    peak); ``curv`` to ``eta_curv`` alone (clamped to ``band``)."""

    @field_validator("adapt_every", "max_iter")
    @classmethod
    def _at_least_one(cls, v: int, info: Any) -> int:
        if v < 1:
            raise LRScaleConfigError(
                info.field_name, v, "must be >= 1", "use e.g. 1000 (adapt_every), 20 (max_iter)"
            )
        return v

    @field_validator("warmup_checks", "start_step")
    @classmethod
    def _non_negative(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v < 0:
            raise LRScaleConfigError(info.field_name, v, "must be >= 0", "use 0, or omit it for the default")
        return v

    @field_validator("beta1", "ema")
    @classmethod
    def _unit(cls, v: float, info: Any) -> float:
        if not (0.0 <= v < 1.0):
            fix = (
                "use Adam's beta1, e.g. 0.9"
                if info.field_name == "beta1"
                else "use 0 (no smoothing) or e.g. 0.5"
            )
            raise LRScaleConfigError(info.field_name, v, "must be in [0, 1)", fix)
        return v

    @field_validator("safety")
    @classmethod
    def _safety(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise LRScaleConfigError("safety", v, "must be in (0, 1]", "use e.g. 0.5")
        return v

    @field_validator("cut_above", "max_change", "max_cut")
    @classmethod
    def _above_one(cls, v: float, info: Any) -> float:
        return _finite(info.field_name, v, lo=1.0, fix="use a finite factor > 1, e.g. 2.0")

    @field_validator("raise_below", "eta_base", "tol", "warmup_tol")
    @classmethod
    def _positive(cls, v: float, info: Any) -> float:
        return _finite(
            info.field_name, v, lo=0.0, fix="use a positive number (see the field's documentation)"
        )

    @field_validator("kappa")
    @classmethod
    def _kappa(cls, v: float | None) -> float | None:
        if v is not None:
            _finite(
                "kappa", v, lo=0.0, fix="calibrate it with lrscale_megatron.curvature_peak.calibrate_kappa"
            )
        return v

    @field_validator("band", mode="before")
    @classmethod
    def _band_shape(cls, v: Any) -> Any:
        if not (isinstance(v, (list, tuple)) and len(v) == 2):
            raise LRScaleConfigError(
                "band", v, "must be a list of two numbers [low, high]", "use e.g. [0.01, 10.0]"
            )
        return v

    @field_validator("band")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(hi) and 0.0 < lo <= 1.0 <= hi):
            raise LRScaleConfigError(
                "band",
                v,
                "must satisfy 0 < low <= 1 <= high",
                "use e.g. [0.01, 10.0] (multiples of the offline peak)",
            )
        return v

    @model_validator(mode="after")
    def _gauge_zones(self) -> OnlineConfig:
        if self.raise_below >= self.safety:
            raise LRScaleConfigError(
                "raise_below",
                self.raise_below,
                f"must be < safety ({self.safety}): a raise aims at g = safety",
                "lower raise_below (e.g. safety / 2) or raise safety",
            )
        return self

    @property
    def threshold(self) -> float:
        """The gauge's unit: ``lambda * lr`` at the edge of stability."""
        if self.rule == "eos":
            return (2.0 + 2.0 * self.beta1) / (1.0 - self.beta1)
        return self.eta_base


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


__all__ = ["LRScaleConfig", "LRScaleConfigError", "ModelSizes", "OnlineConfig"]
