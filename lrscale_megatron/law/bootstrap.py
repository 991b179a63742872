"""Bootstrap resamples of a log-linear fit, over whole groups when groups are given (Efron 1979).

Optima of one group (the same (params, tokens): several batch sizes, or repeated seeds) share the
runs' noise, so the grouped CV holds a whole group out; the bootstrap resamples whole groups the same
way (a cluster bootstrap, Davison & Hinkley 1997 sec. 3.8). Resampling single points treats correlated
optima as independent evidence and makes the intervals too narrow.

A resample whose centred log design cannot identify every exponent (rank < p, e.g. every drawn group
has the same params) is drawn again; redraws are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lrscale_megatron.law.fit import FitConfig

logger = logging.getLogger(__name__)


def _identifiable(log_x: np.ndarray, p: int) -> bool:
    xc = log_x - log_x.mean(axis=0)
    return log_x.shape[0] >= p + 1 and int(np.linalg.matrix_rank(xc, tol=1e-9)) == p


def bootstrap_fits(
    log_x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    groups: Sequence[object] | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, str]:
    """``(samples, unit)``: ``config.bootstrap`` rows of ``[log_c, e_1, ..., e_p]`` and ``"group"`` or
    ``"point"``. Groups are used when given and there are at least 3 of them."""
    from lrscale_megatron.law.fit import _fit_once

    p = log_x.shape[1]
    rng = np.random.default_rng(config.seed)
    codes = None
    if groups is not None:
        codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
        if codes.max() + 1 < 3:
            codes = None
    members = [np.flatnonzero(codes == g) for g in range(int(codes.max()) + 1)] if codes is not None else []
    out = np.empty((config.bootstrap, p + 1))
    redraws = 0
    for b in range(config.bootstrap):
        for _ in range(100):
            if codes is None:
                idx = rng.integers(0, y.size, y.size)
            else:
                idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            if _identifiable(log_x[idx], p):
                break
            redraws += 1
        else:
            raise ValueError(
                f"bootstrap: 100 resamples in a row cannot identify {p} exponents from "
                f"{len(members) or y.size} {'groups' if codes is not None else 'points'}; "
                "fix: more distinct proxies (or groups), or fewer predictors"
            )
        out[b] = _fit_once(log_x[idx], y[idx], config.regressor, config.huber_epsilon, notes)
    unit = "group" if codes is not None else "point"
    if redraws:
        logger.info("bootstrap: %d degenerate resample(s) drawn again", redraws)
    return out, unit
