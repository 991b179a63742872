"""Separability of power-law predictors: condition number, variance inflation factors and rank of the
centred log design (Belsley, Kuh & Welsch 1980). Predictors the data cannot separate (width and depth
that move together, as in the Step Law runs) are refused with :class:`CollinearityError`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _log_design(columns: Mapping[str, np.ndarray | float], predictors: Sequence[str]) -> np.ndarray:
    out = []
    for p in predictors:
        if p not in columns:
            raise ValueError(
                f"predictor {p!r} has no column; fix: provide one of {sorted(columns)} or add column {p!r}"
            )
        x = np.atleast_1d(np.asarray(columns[p], dtype=float))
        if not np.all(np.isfinite(x) & (x > 0)):
            raise ValueError(
                f"predictor {p!r} has non-positive or non-finite values; fix: a power law needs x > 0"
            )
        out.append(np.log(x))
    return np.column_stack(out)


class CollinearityError(ValueError):
    """The design cannot separate some predictors; ``report`` says which and why."""

    def __init__(self, report: CollinearityReport) -> None:
        super().__init__(report.explain())
        self.report = report


@dataclass(frozen=True)
class CollinearityReport:
    """Separability of the predictors in the centred log design.

    Attributes:
        predictors: the checked columns.
        condition_number: ratio of extreme singular values of the centred, column-normalised log design.
        vif: variance inflation factor per predictor (``inf`` = exact linear dependence).
        rank: numerical rank of the centred log design.
        inseparable: predictors whose exponents the data cannot separate (empty when all is well).
        max_condition, max_vif: the thresholds applied.
    """

    predictors: tuple[str, ...]
    condition_number: float
    vif: dict[str, float]
    rank: int
    inseparable: tuple[str, ...]
    max_condition: float
    max_vif: float

    @property
    def separable(self) -> bool:
        return not self.inseparable

    def explain(self) -> str:
        vifs = ", ".join(f"{k}={v:.3g}" for k, v in self.vif.items())
        head = (
            f"condition number {self.condition_number:.3g} (limit {self.max_condition:g}), "
            f"VIF {vifs} (limit {self.max_vif:g}), rank {self.rank} of {len(self.predictors)}"
        )
        if self.separable:
            return f"predictors {', '.join(self.predictors)} are separable: {head}"
        return (
            f"predictors {', '.join(self.inseparable)} cannot be separated by this data ({head}); "
            "separate exponents for them would not be meaningful, so none are reported. "
            "fix: keep only one of them, or replace width/depth by 'params'"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "predictors": list(self.predictors),
            "condition_number": _finite_or_none(self.condition_number),
            "vif": {k: _finite_or_none(v) for k, v in self.vif.items()},
            "rank": self.rank,
            "inseparable": list(self.inseparable),
        }


def check_collinearity(
    columns: Mapping[str, np.ndarray],
    predictors: Sequence[str],
    max_condition: float = 30.0,
    max_vif: float = 5.0,
) -> CollinearityReport:
    """Condition number, VIFs and rank of the centred log design; flags inseparable predictors."""
    names = tuple(predictors)
    x = _log_design(columns, names)
    xc = x - x.mean(axis=0)
    norms = np.linalg.norm(xc, axis=0)
    constant = [names[j] for j in range(len(names)) if norms[j] <= 1e-12 * max(1.0, np.abs(x[:, j]).max())]
    xs = xc / np.where(norms > 0, norms, 1.0)
    s = np.linalg.svd(xs, compute_uv=False)
    rank = int(np.sum(s > 1e-8 * s[0])) if s[0] > 0 else 0
    cond = float(s[0] / s[-1]) if s[-1] > 1e-12 * max(s[0], 1e-300) else float("inf")
    vif: dict[str, float] = {}
    for j, name in enumerate(names):
        if name in constant:
            vif[name] = float("inf")
            continue
        others = np.delete(xs, j, axis=1)
        if others.shape[1] == 0:
            vif[name] = 1.0
            continue
        beta, *_ = np.linalg.lstsq(others, xs[:, j], rcond=None)
        resid = float(np.sum((xs[:, j] - others @ beta) ** 2))
        vif[name] = 1.0 / resid if resid > 1e-12 else float("inf")
    bad = [n for n in names if vif[n] > max_vif or n in constant]
    if not bad and (cond > max_condition or rank < len(names)):
        bad = list(names)
    return CollinearityReport(names, cond, vif, rank, tuple(bad), max_condition, max_vif)
