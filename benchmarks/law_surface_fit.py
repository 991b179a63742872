"""A joint loss-surface fit of the LR law on the Step Law CSV, scored by leave-one-(N, D)-out regret.

    python benchmarks/law_surface_fit.py [--csv ../shared/data/steplaw/dense_lr_bs_loss.subset.csv]

Instead of locating eta* per sweep and regressing log eta*, fit the law's coefficients directly to the
loss curves: for each sweep s, over the points within ``w`` grid steps of its argmin,
``loss_s(lr) / min loss_s - 1 = m_s + k_s (log lr - mu(x_s))^2`` with ``mu(x) = log c + sum_j e_j log x_j``;
per-sweep ``m_s, k_s >= 0`` are solved in closed form for each trial ``mu`` (variable projection) and
``(log c, e)`` by scipy ``least_squares`` (losses linear / soft_l1 / huber), started from the lsq5 + Huber
fit. Recorded in docs/scaling-law.md as tried and not shipped (it does not beat argmin). ~1 min, 1 core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from lrscale_megatron.law.data import load_steplaw_csv
from lrscale_megatron.law.evaluate import RegretSummary, regret_at
from lrscale_megatron.law.fit import FitConfig, fit_power_law, optima_columns
from lrscale_megatron.law.optimum import extract_optima, group_curves

P = ("params", "tokens", "batch")


def windows(curves, w):
    out = []
    for c in curves:
        x, y = np.log(c.lr), np.asarray(c.loss)
        i = int(np.argmin(y))
        if i in (0, y.size - 1):
            continue
        sl = slice(max(i - w, 0), min(i + w + 1, y.size))
        out.append((x[sl], y[sl] / y[i] - 1.0, np.log([c.key.column(p) for p in P])))
    return out


def residuals(theta, win):
    r = []
    for x, y, z in win:
        q = (x - theta[0] - z @ theta[1:]) ** 2
        a = np.column_stack([np.ones_like(q), q])
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        if coef[1] < 0:
            coef = np.array([y.mean(), 0.0])
        r.append(y - a @ coef)
    return 100 * np.concatenate(r)


def fit_surface(curves, loss, w):
    opt = extract_optima(list(curves), "lsq5")
    f = fit_power_law(
        optima_columns(opt),
        np.array([o.eta_star for o in opt]),
        FitConfig(P, folds=0, bootstrap=0),
        check=False,
    )
    theta0 = np.array([f.log_c] + [f.exponents[p] for p in P])
    return least_squares(residuals, theta0, args=(windows(curves, w),), loss=loss, f_scale=0.1).x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--csv",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/steplaw/dense_lr_bs_loss.subset.csv"),
    )
    curves = group_curves(load_steplaw_csv(ap.parse_args().csv))
    nds = sorted({(c.key.params, c.key.tokens) for c in curves})
    print("| loss | window (grid steps) | mean | median | p90 | max | MAE log LR |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("linear", "soft_l1", "huber"):
        for w in (1, 2, 3):
            t = time.time()
            rows = []
            for nd in nds:
                th = fit_surface([c for c in curves if (c.key.params, c.key.tokens) != nd], loss, w)
                for c in curves:
                    if (c.key.params, c.key.tokens) == nd:
                        z = np.log([c.key.column(p) for p in P])
                        rows.append(regret_at(c, float(np.exp(th[0] + z @ th[1:]))))
            s = RegretSummary.of(loss, rows)
            print(
                f"| {loss} | {w} | {s.mean:.3f} | {s.median:.3f} | {s.p90:.3f} | {s.max:.2f} | {s.mae_log_lr:.3f} |"
                f"  <!-- {time.time() - t:.0f} s -->"
            )


if __name__ == "__main__":
    main()
