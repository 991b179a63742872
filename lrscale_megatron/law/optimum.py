"""Optimal learning rate eta* of each (width, depth, tokens, batch) group from its loss-vs-LR curve.

Methods (all work in log LR, where LR sweeps are uniform):

1. ``argmin``   the grid LR of the lowest loss.
2. ``parabola`` the vertex of the parabola through the argmin and its two grid neighbours
                (sub-grid interpolation), clamped to that bracket; falls back to the argmin when the
                three points are not convex.
3. ``lsq5``     the vertex of a least-squares parabola through up to five points around the argmin
                (a local fit of the loss surface; less sensitive to one noisy run), clamped likewise.
4. ``band``     geometric mean of the grid LRs whose loss is within ``band`` (relative, 0.25 % as in
                Step Law, Li et al. 2025) of the best loss in the group.

A group whose lowest loss sits at the smallest or largest LR of its grid is *on the edge*: its optimum
is not bracketed, so it is flagged and left out of fits. A *diverged* run has loss ``+inf`` (worse than
any finite loss): an optimum just below the divergence LR is bracketed by it (not on the edge); the
parabola methods use only finite points and fall back to the argmin when fewer than three are left.
A group whose runs all diverged has no optimum and is left out.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lrscale_megatron.law.data import RunTable

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("argmin", "parabola", "lsq5", "band")


@dataclass(frozen=True, order=True)
class GroupKey:
    """The configuration shared by every run of one LR sweep."""

    params: float
    tokens: float
    batch_tokens: float
    width: float
    depth: float

    def column(self, predictor: str) -> float:
        return self.batch_tokens if predictor == "batch" else float(getattr(self, predictor))


@dataclass(frozen=True)
class Curve:
    """Loss against LR for one group, sorted by LR; duplicate LRs (same to 0.01 in log2) are averaged."""

    key: GroupKey
    lr: tuple[float, ...]
    loss: tuple[float, ...]


@dataclass(frozen=True)
class Optimum:
    """eta* of one group.

    Attributes:
        key: the group.
        eta_star: estimated optimal peak LR.
        bracket: grid LRs either side of the argmin (``(lr, lr)`` at an edge).
        loss_star: lowest loss on the grid.
        on_edge: the argmin is the smallest or largest grid LR (optimum not bracketed).
        n_lr: grid points in the group.
        method: extraction method (see module docstring).
    """

    key: GroupKey
    eta_star: float
    bracket: tuple[float, float]
    loss_star: float
    on_edge: bool
    n_lr: int
    method: str


def group_curves(table: RunTable) -> list[Curve]:
    """Split runs into LR sweeps keyed by (params, tokens, batch_tokens, width, depth)."""
    buckets: dict[GroupKey, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for i in range(len(table)):
        key = GroupKey(
            float(table.params[i]),
            float(table.tokens[i]),
            float(table.batch_tokens[i]),
            float(table.width[i]),
            float(table.depth[i]),
        )
        lr = float(table.lr[i])
        buckets[key][round(float(np.log2(lr)), 2)].append((lr, float(table.loss[i])))
    curves = []
    for key in sorted(buckets):
        pts = sorted(
            (float(np.exp(np.mean(np.log([p[0] for p in v])))), float(np.mean([p[1] for p in v])))
            for v in buckets[key].values()
        )
        curves.append(Curve(key, tuple(p[0] for p in pts), tuple(p[1] for p in pts)))
    return curves


def _vertex(x: np.ndarray, y: np.ndarray, lo: float, hi: float, fallback: float) -> float:
    ok = np.isfinite(y)
    if ok.sum() < 3:  # a diverged neighbour: no parabola through three finite points
        return fallback
    a, b, _ = np.polyfit(x[ok], y[ok], 2)
    if not a > 0:  # flat or concave: no interior minimum
        return fallback
    return float(np.clip(-b / (2 * a), lo, hi))


def optimum_of_curve(curve: Curve, method: str = "parabola", band: float = 0.0025) -> Optimum:
    """eta* of one curve by ``method`` (see module docstring)."""
    if method not in METHODS:
        raise ValueError(f"optimum method={method!r}; fix: use one of {METHODS}")
    x = np.log(np.asarray(curve.lr))
    y = np.asarray(curve.loss)
    n = x.size
    if n < 3:
        raise ValueError(f"group {curve.key}: n_lr={n}; fix: an LR sweep needs at least 3 learning rates")
    if not np.isfinite(y).any():
        raise ValueError(f"group {curve.key}: every run diverged; fix: lower the group's LR grid")
    i = int(np.argmin(y))
    on_edge = i == 0 or i == n - 1
    lo_i, hi_i = max(i - 1, 0), min(i + 1, n - 1)
    bracket = (float(np.exp(x[lo_i])), float(np.exp(x[hi_i])))
    log_eta = float(x[i])
    if not on_edge and method == "parabola":
        log_eta = _vertex(x[i - 1 : i + 2], y[i - 1 : i + 2], x[lo_i], x[hi_i], x[i])
    elif not on_edge and method == "lsq5":
        sl = slice(max(i - 2, 0), min(i + 3, n))
        log_eta = _vertex(x[sl], y[sl], x[lo_i], x[hi_i], x[i])
    elif method == "band":
        log_eta = float(np.mean(x[y <= y[i] * (1 + band)]))
    return Optimum(curve.key, float(np.exp(log_eta)), bracket, float(y[i]), on_edge, n, method)


def extract_optima(
    table: RunTable | list[Curve], method: str = "parabola", min_lr_points: int = 3, keep_edge: bool = False
) -> list[Optimum]:
    """eta* for every group with at least ``min_lr_points`` LRs; edge groups dropped unless ``keep_edge``."""
    curves = group_curves(table) if isinstance(table, RunTable) else table
    out: list[Optimum] = []
    n_edge = n_short = n_div = 0
    for c in curves:
        if len(c.lr) < min_lr_points:
            n_short += 1
            continue
        if not np.isfinite(c.loss).any():
            n_div += 1
            logger.warning("group %s: every run diverged; left out (lower its LR grid)", c.key)
            continue
        opt = optimum_of_curve(c, method)
        if opt.on_edge:
            n_edge += 1
            if not keep_edge:
                continue
        out.append(opt)
    logger.info(
        "%d groups: %d optima (%s), %d on the grid edge%s, %d with < %d LRs",
        len(curves),
        len(out),
        method,
        n_edge,
        " (kept)" if keep_edge else " (left out)",
        n_short,
        min_lr_points,
    )
    return out
