"""PNG figures (matplotlib, Agg backend): loss-vs-LR sweeps with eta*, predicted-vs-measured eta*."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lrscale_megatron.law.lawfile import ScalingLaw  # noqa: E402
from lrscale_megatron.law.optimum import Curve, Optimum  # noqa: E402
from lrscale_megatron.law.predict import predict  # noqa: E402

logger = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write as PNG (dpi 90, parent directories created), close."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out


def plot_loss_vs_lr(curves: Sequence[Curve], optima: Sequence[Optimum], path: str | Path) -> Path:
    """One panel per (params, tokens); one line per batch size; eta* marked on each line."""
    by_nd: dict[tuple[float, float], list[Curve]] = defaultdict(list)
    for c in curves:
        by_nd[(c.key.params, c.key.tokens)].append(c)
    opt = {o.key: o for o in optima}
    keys = sorted(by_nd)
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    for ax, nd in zip(axes.flat, keys, strict=False):
        group = sorted(by_nd[nd], key=lambda c: c.key.batch_tokens)
        cmap = plt.get_cmap("viridis", max(len(group), 2))
        for i, c in enumerate(group):
            ax.plot(c.lr, c.loss, "-", color=cmap(i), lw=1, label=f"B={c.key.batch_tokens:.3g}")
            o = opt.get(c.key)
            if o is not None:
                ax.plot([o.eta_star], [o.loss_star], "v", color=cmap(i), ms=5)
        ax.set_xscale("log")
        ax.set_title(f"N={nd[0]:.3g}, D={nd[1]:.3g}", fontsize=9)
        lo = min(min(c.loss) for c in group)
        hi = max(min(c.loss) for c in group)  # every batch's minimum stays in view
        ax.set_ylim(lo - 0.005 * lo, hi + 0.04 * hi)
        ax.set_xlabel("peak LR")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path)


def plot_predicted_vs_measured(law: ScalingLaw, optima: Sequence[Optimum], path: str | Path) -> Path:
    """Measured eta* (x, with its grid bracket) against predicted (y, with the bootstrap interval)."""
    meas, pred, plo, phi, xlo, xhi, tok = [], [], [], [], [], [], []
    for o in optima:
        p = predict(
            law,
            params=o.key.params,
            tokens=o.key.tokens,
            batch_tokens=o.key.batch_tokens,
            width=o.key.width,
            depth=o.key.depth,
        )
        meas.append(o.eta_star)
        pred.append(p.peak_lr)
        plo.append(p.peak_lr - p.interval[0])
        phi.append(p.interval[1] - p.peak_lr)
        xlo.append(o.eta_star - o.bracket[0])
        xhi.append(o.bracket[1] - o.eta_star)
        tok.append(o.key.tokens)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.errorbar(meas, pred, xerr=[xlo, xhi], yerr=[plo, phi], fmt="none", ecolor="0.7", lw=0.8)
    sc = ax.scatter(meas, pred, c=np.log10(tok), s=12, cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 tokens")
    lim = (min(meas + pred) / 1.3, max(meas + pred) * 1.3)
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("measured eta* (bracket = grid neighbours)")
    ax.set_ylabel(f"predicted ({law.name}; 5-95% bootstrap)")
    return _save(fig, path)
