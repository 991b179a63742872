"""The ``online`` block of the LRScale scheduler's config (:class:`OnlineConfig`), and the scheduler
configs' shared pieces (:class:`LRScaleConfigError`, the pydantic base); :mod:`lrscale_megatron.scheduler_config`
re-exports them. Out of ``scheduler_config`` only to keep modules small.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lrscale_megatron.configs.base import ConfigError, ConfigModel

Rule = Literal["eos", "inverse"]
Combine = Literal["min", "max", "geomean", "online"]
HvpMode = Literal["exact", "fd"]
BasisMode = Literal["auto", "host", "recompute"]
VectorsMode = Literal["device", "host", "auto"]
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
    adapt_every: int = 2000
    """Measure every this many steps (a multiple crossed, in samples, under Megatron-LM). A measurement at the
    defaults (``hvp="fd"``, preconditioned, ``tol`` 3e-2) took 7-25 products, ~9-45 training iterations' time,
    on the CPU GPTs of docs/benchmarks.md ("Online adaptation overhead (issue 11, third pass)"): ~2 % of the
    training time at one per 1000 iterations, hence 2000 (the warmup checks come on top; a late
    instability is seen at most this many steps after it starts)."""
    warmup_checks: int = 1
    """Measurements at ``k * warmup_steps / warmup_checks`` (k = 1..n; default: the end of warmup), besides
    the early ``warmup_first`` check. 0: none before ``adapt_every`` (and no ``warmup_first`` check either)."""
    warmup_first: float | None = 0.1
    """One more, early, warmup check at this fraction of the warmup (never before step
    :data:`~lrscale_megatron.adapter.FIRST_CHECK_MIN_STEP`: after one Adam step the second moment is one
    squared gradient). Early in warmup the LR in force is far below the peak, so this check reads the
    *projected* gauge (``project_below``). ``None``: only the ``warmup_checks``."""
    project_above: float = 1.25
    """During warmup, a gauge above this is projected to the peak too: beyond the edge for the LR in force
    while the LR is still rising. ``[project_below, project_above]`` is the band around the edge (±15 %
    measured noise plus a margin) where the sharpness may be held by the LR in force, and is not projected."""
    project_below: float = 0.8
    """During warmup, a gauge below this (or above ``project_above``) is projected to the peak:
    ``g_peak = lambda * peak / threshold``, the classic ``lr <= 2 / lambda`` check done before warmup takes
    the LR there, and the peak is cut when ``g_peak > cut_above``. Below the edge the sharpness is the
    model's own curvature (at small LR it does not depend on the LR: measured within 10 % from 1/4 to 4x
    a good peak); near the edge it may be held there by the LR in force (Adam's self-stabilisation) and
    says nothing about the peak, so ``project_below <= g <= project_above`` holds. 0: no projection."""
    warmup_safety: float = 1.0
    """Projected gauge at the peak after a warmup (projected) cut: 1 puts the peak at the edge for the
    curvature measured early in warmup, which falls as training proceeds (measured 5-7x lower by the end
    of warmup on cpu-tiny), so the peak is below the edge where it is reached."""
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
    basis: BasisMode = "auto"
    """Where the k=1 Lanczos basis lives (:func:`~lrscale_megatron.curvature.lanczos`): ``"host"`` in host
    memory (2 device vectors, no extra products; each iteration copies one vector to the host and reads
    one back), ``"recompute"`` nowhere (4 device vectors, a second pass of ``m - 1`` products rebuilds the
    Ritz vector), ``"auto"`` the host when every rank's host budget has room, else the second pass. Pick
    ``"recompute"`` where host-device copies are slow next to a product (measure with
    ``benchmarks/gpu_check.sh``)."""
    vectors: VectorsMode = "device"
    """Where a measurement's vectors live (:mod:`lrscale_megatron.curvature.hostvectors`): ``"device"``, or
    ``"host"`` (``hvp="fd"`` with bf16/fp16 parameters): Lanczos' ``q``, the products, the base gradient
    and the preconditioner's scale in host memory (page-locked), so the GPU holds only the float32
    substitutes ``theta + h q`` and one float32 forward/backward (docs/benchmarks.md: 4.9 instead of 8.9 x
    bf16 parameter bytes over the training step on the 834k GPT); each product copies ``q`` to the GPU and
    its gradient back. ``"auto"``: ``"host"`` where that applies and the device plan does not fit the GPU's
    free memory when the estimator is attached (:func:`lrscale_megatron.preflight.preflight` decides and
    logs it), else ``"device"``."""
    batch_split: int = 1
    """Evaluate the held batch in this many equal parts along dim 0 (a divisor of its size): a product
    then holds one part's activations (float32 for a bf16 model: ``vectors="host"`` with ``batch_split=2``
    measured 1.9 x bf16 parameter bytes over the training step); the Hessian is that of the mean of the
    parts' losses, the batch's own when every part carries as many loss tokens (padding changes the
    weighting). Not with a user ``grad_fn``."""
    tol: float = 3e-2
    """Lanczos relative residual tolerance after warmup. The decisions compare the gauge with thresholds a
    factor 2 apart (``cut_above`` 2, ``raise_below`` 0.25) or with a ±20-25 % band (``project_below``,
    ``project_above``), and the gauge itself moves ±15 % between held batches; a 3 % residual bounds the
    Ritz value's error by 3 % (for the top eigenvalue of a symmetric operator typically far less:
    ``residual^2 / gap``), so it is ample, and it ends a measurement 1-2 Lanczos iterations (2-4 products)
    earlier than 1e-2 (docs/benchmarks.md, "Online adaptation overhead (issue 11, third pass)")."""
    warmup_tol: float = 3e-2
    """Lanczos tolerance during warmup (the same as ``tol`` by default; set it looser for cheaper warmup
    checks)."""
    seed: int = 0
    """Lanczos start-vector seed (fixed: identical estimates on every rank)."""
    warm_start: bool = True
    """Start each measurement's Lanczos from the previous converged top Ritz vector (of the same
    parameters) plus the seeded random vector in equal parts: fewer products when the top direction moves
    little (CPU demo, 100 iterations apart: 9-13 products per measurement instead of 13-19), and the
    random part keeps a random start's guarantee of seeing the top eigenvalue. Costs one
    parameter-sized vector per measured parameter set, kept between measurements (not in the preflight's
    per-measurement memory estimate). A resumed run's first measurement starts cold (the
    vector is not checkpointed), so its estimate may differ within ``tol``."""
    kappa: float | None = None
    """Curvature predictor ``eta_curv = kappa / lambda`` (kappa from a proxy ladder,
    :func:`lrscale_megatron.curvature_peak.calibrate_kappa`), applied once, at the first measurement at
    or after the end of warmup. ``None``: off."""
    curvature_peak: CurvaturePeakMode = "max"
    """With ``kappa``: ``max`` sets the peak to ``max(offline peak, eta_curv)`` (the seed's combined
    peak); ``curv`` to ``eta_curv`` alone (clamped to ``band``)."""

    @field_validator("adapt_every", "max_iter", "batch_split")
    @classmethod
    def _at_least_one(cls, v: int, info: Any) -> int:
        if v < 1:
            raise LRScaleConfigError(
                info.field_name,
                v,
                "must be >= 1",
                "use e.g. 1000 (adapt_every), 20 (max_iter), 1 (batch_split)",
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

    @field_validator("safety", "warmup_safety")
    @classmethod
    def _safety(cls, v: float, info: Any) -> float:
        if not (0.0 < v <= 1.0):
            fix = "use e.g. 0.5" if info.field_name == "safety" else "use e.g. 1.0"
            raise LRScaleConfigError(info.field_name, v, "must be in (0, 1]", fix)
        return v

    @field_validator("warmup_first")
    @classmethod
    def _first(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise LRScaleConfigError(
                "warmup_first", v, "must be in (0, 1] (a fraction of the warmup)", "use e.g. 0.1, or null"
            )
        return v

    @field_validator("project_above")
    @classmethod
    def _project_above(cls, v: float) -> float:
        return _finite(
            "project_above", v, lo=1.0, lo_open=False, fix="use e.g. 1.25 (a gauge above the edge)"
        )

    @field_validator("project_below")
    @classmethod
    def _project_below(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise LRScaleConfigError(
                "project_below", v, "must be in [0, 1] (a gauge below the edge)", "use e.g. 0.8, or 0 (off)"
            )
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


__all__ = ["Combine", "CurvaturePeakMode", "HvpMode", "LRScaleConfigError", "OnlineConfig", "Rule"]
