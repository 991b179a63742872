"""Peak LR from a law: point estimate, bootstrap interval, range warnings, batch suggestion.

The interval is the ``interval_level`` central range of the law's prediction over its bootstrap
coefficient samples (5-95 % by default), i.e. the fit uncertainty propagated to this input; it does
not include the run-to-run scatter of eta* around the law.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrscale_megatron.law.lawfile import ScalingLaw

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Outcome of :func:`predict`.

    Attributes:
        peak_lr: predicted optimal peak LR.
        interval: (lo, hi) over the bootstrap samples; ``(peak_lr, peak_lr)`` when the law has none.
        batch_tokens: suggested batch size in tokens (the law's batch law), ``None`` without one.
        warnings: human-readable warnings (extrapolation factors, missing interval).
        law: name of the law used.
        inputs: the predictor values used.
    """

    peak_lr: float
    interval: tuple[float, float]
    batch_tokens: float | None
    warnings: tuple[str, ...]
    law: str
    inputs: dict[str, float]


def _check(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"predict: {name}={value!r}; fix: {name} must be a positive finite number")
    return x


def predict(
    law: ScalingLaw,
    params: float | None = None,
    tokens: float | None = None,
    batch_tokens: float | None = None,
    width: float | None = None,
    depth: float | None = None,
    extra: dict[str, float] | None = None,
    interval_level: float = 0.90,
) -> Prediction:
    """Predict the peak LR of a model with ``params`` non-embedding parameters trained on ``tokens``.

    ``batch_tokens`` is required when the law has a ``batch`` predictor, except that a law with a
    batch law then uses its suggested batch (with a warning). ``extra`` gives values of extra
    predictors (e.g. a curvature column) by name.
    """
    values = {
        "params": _check("params", params),
        "tokens": _check("tokens", tokens),
        "batch": _check("batch_tokens", batch_tokens),
        "width": _check("width", width),
        "depth": _check("depth", depth),
    }
    for k, v in (extra or {}).items():
        values[k] = _check(k, v)
    warns: list[str] = []
    suggestion = None
    if law.batch_law is not None:
        need = {k: values.get(k) for k in law.batch_law.exponents}
        if all(v is not None for v in need.values()):
            suggestion = float(law.batch_law({k: float(v) for k, v in need.items() if v is not None}))
    if "batch" in law.predictors and values["batch"] is None and suggestion is not None:
        values["batch"] = suggestion
        warns.append(f"batch_tokens not given: using the law's suggested batch_tokens={suggestion:.4g}")
    x: dict[str, float] = {}
    for p in law.predictors:
        given = values.get(p)
        if given is None:
            arg = "batch_tokens" if p == "batch" else p
            raise ValueError(f"predict: law {law.name!r} needs {arg}, got None; fix: pass {arg}=...")
        x[p] = v = given
        if law.fitted_ranges is not None:
            lo, hi = law.fitted_ranges[p]
            arg = "batch_tokens" if p == "batch" else p
            if v < lo * (1 - 1e-9):
                warns.append(f"{arg}={v:.4g} is {lo / v:.3g}x below the fitted range [{lo:.4g}, {hi:.4g}]")
            elif v > hi * (1 + 1e-9):
                warns.append(f"{arg}={v:.4g} is {v / hi:.3g}x above the fitted range [{lo:.4g}, {hi:.4g}]")
    log_x = np.array([math.log(x[p]) for p in law.predictors])
    e = np.array([law.exponents[p] for p in law.predictors])
    peak = float(law.coefficient * math.exp(float(log_x @ e)))
    if law.bootstrap_log_c:
        samples = np.column_stack([law.bootstrap_exponents[p] for p in law.predictors])
        preds = np.exp(np.asarray(law.bootstrap_log_c) + samples @ log_x)
        tail = 100 * (1 - interval_level) / 2
        lo_hi = np.percentile(preds, [tail, 100 - tail])
        interval = (float(min(lo_hi[0], peak)), float(max(lo_hi[1], peak)))
    else:
        interval = (peak, peak)
        warns.append(f"law {law.name!r} has no bootstrap samples: the interval is the point estimate only")
    for w in warns:
        logger.debug("%s", w)
    return Prediction(peak, interval, suggestion, tuple(warns), law.name, x)


def deepspeed_scheduler_block(prediction: Prediction | float, **params: Any) -> dict[str, Any]:
    """A DeepSpeed ``"scheduler"`` section for the LRScale scheduler.

    ``params`` are passed through (e.g. ``warmup_steps``, ``total_steps``, ``min_lr``; steps are
    optimizer iterations), ``peak_lr`` is always the prediction.
    """
    peak = prediction.peak_lr if isinstance(prediction, Prediction) else float(prediction)
    if not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"deepspeed_scheduler_block: peak_lr={peak!r}; fix: pass a positive prediction")
    if "peak_lr" in params:
        raise ValueError("deepspeed_scheduler_block: peak_lr is set from the prediction; fix: do not pass it")
    return {"type": "LRScale", "params": {"peak_lr": peak, **params}}


def prediction_to_json(prediction: Prediction, **scheduler_params: Any) -> dict[str, Any]:
    """The ``lrscale predict --json`` document."""
    return {
        "peak_lr": prediction.peak_lr,
        "interval": list(prediction.interval),
        "batch_tokens": prediction.batch_tokens,
        "warnings": list(prediction.warnings),
        "law": prediction.law,
        "deepspeed_scheduler": deepspeed_scheduler_block(prediction, **scheduler_params),
    }
