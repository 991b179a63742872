"""Time-to-target and spread statistics over a run's history: pure functions, no torch.

Steps-to-target is read off the validation evaluations (every ``eval_every`` iterations, plus the last):
the first evaluation at or below the target gives ``first_eval_step``; ``steps`` linearly interpolates
the validation loss between that evaluation and the one before it (the crossing step, fractional). The
first evaluation has no predecessor, so a run already at target there reports that step. Wall-clock
and tokens to target are the training clock (evaluation excluded) and ``tokens_per_step x steps`` at
the interpolated step.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ToTarget:
    """How a run reached the target loss (``None`` everywhere when it never did).

    Attributes:
        steps: interpolated crossing iteration (fractional).
        first_eval_step: first evaluated iteration with ``val_loss <= target``.
        wall_s: training wall-clock seconds at ``steps`` (interpolated between iterations).
        tokens: training tokens at ``steps``.
    """

    steps: float | None
    first_eval_step: int | None
    wall_s: float | None
    tokens: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NOT_REACHED = ToTarget(None, None, None, None)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear ``y(x)`` on increasing ``xs`` (clamped at the ends)."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return ys[-1]


def to_target(history: Sequence[dict[str, Any]], target: float, tokens_per_step: float) -> ToTarget:
    """Steps, wall-clock and tokens to ``target`` from a run's history (``StepRecord`` dicts, step order)."""
    evals = [(int(r["step"]), float(r["val_loss"])) for r in history if r.get("val_loss") is not None]
    prev: tuple[int, float] | None = None
    for step, loss in evals:
        if math.isfinite(loss) and loss <= target:
            if prev is None or not math.isfinite(prev[1]) or prev[1] == loss:
                crossing = float(step)
            else:  # loss falls from prev[1] > target to loss <= target between prev[0] and step
                crossing = prev[0] + (prev[1] - target) / (prev[1] - loss) * (step - prev[0])
            steps = [0.0] + [float(r["step"]) for r in history]
            walls = [0.0] + [float(r["wall_s"]) for r in history]
            return ToTarget(
                steps=crossing,
                first_eval_step=step,
                wall_s=_interp(crossing, steps, walls),
                tokens=crossing * tokens_per_step,
            )
        prev = (step, loss)
    return NOT_REACHED


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{mean, std, min, max, n, n_missing}`` over the non-``None`` values (sample std, 0 for one value;
    all ``None`` -> statistics ``None``)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "n_missing": len(values)}
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "n_missing": len(values) - len(xs),
    }


def mean_if_all(values: Sequence[float | None]) -> float | None:
    """The mean when every seed has a value, else ``None`` (an arm reaches the target only if all seeds do)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(float(v) for v in values if v is not None)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def measurement_overhead(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Wall-clock spent in online curvature measurements, from per-step times.

    A measurement runs inside the optimizer step of the iterations whose record carries ``lambda_max``;
    its cost is that step's time minus the median step time. Returns ``{"measure_s", "n_measurements",
    "train_s", "fraction"}`` with ``fraction = measure_s / (wall_s - measure_s)``: far less sensitive to
    machine load than comparing two runs' totals.
    """
    if not history:
        return {"measure_s": 0.0, "n_measurements": 0, "train_s": 0.0, "fraction": 0.0}
    walls = [0.0] + [float(r["wall_s"]) for r in history]
    dts = [walls[i + 1] - walls[i] for i in range(len(history))]
    med = statistics.median(dts)
    idx = [i for i, r in enumerate(history) if r.get("lambda_max") is not None]
    excess = sum(max(dts[i] - med, 0.0) for i in idx)
    total = walls[-1]
    base = total - excess
    return {
        "measure_s": excess,
        "n_measurements": len(idx),
        "train_s": total,
        "fraction": excess / base if base > 0 else math.nan,
    }
