"""CPU sweep analysis: distribution shift of eta*, and the curvature predictor kappa / lambda_max vs the
pure power law on the same cross-validation folds.

    lrscale sweep configs/sweep/cpu-sweep.json                         # the runs (resumable)
    python benchmarks/law_cpu_sweep.py --measure                       # + lambda_max at init per group
    python benchmarks/law_cpu_sweep.py --json out.json --plot docs/img/cpu-sweep-curvature.png

1. **Shift.** eta* per (width, depth, tokens, batch) sweep located on the validation loss (Shakespeare,
   the training corpus) and on the shift-corpus loss (KJV) of the same runs; the change in log eta*, and
   the law fitted on validation optima scored on the shift optima (R^2, MAE of log eta*) and by regret
   on the shift-loss curves.
2. **Curvature.** ``lambda_max`` of the loss Hessian at init per (width, depth, batch) group, raw and
   Adam-preconditioned (:mod:`lrscale_megatron.sweep.curvature`; Lanczos over exact HVPs). Grouped 5-fold CV by
   (params, tokens), identical folds for every predictor set:
   ``eta* = kappa / lambda_max`` (kappa fitted per fold: mean of log(eta* lambda_max)),
   ``eta* = c lambda_max^e`` (free exponent, through the fit module's extra-column hook),
   ``eta* = c lambda_max^e tokens^f`` and the pure power law ``params, tokens, batch``.
Single process, CPU; the fit part takes seconds, ``--measure`` about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold

from lrscale_megatron.law.data import RunTable, load_store
from lrscale_megatron.law.evaluate import RegretSummary, regret_at
from lrscale_megatron.law.fit import FitConfig, _log_design, cross_validate, fit_power_law, optima_columns
from lrscale_megatron.law.optimum import Optimum, extract_optima, group_curves
from lrscale_megatron.law.pipeline import nd_groups

ROOT = Path(__file__).resolve().parents[1]
POWER = ("width", "depth", "tokens", "batch")  # the (withdrawn) cpu-sweep law's predictors


def shift_table(db: Path) -> RunTable:
    """The store's finished runs with the shift-corpus loss as ``loss``."""
    from lrscale_megatron.sweep.megatron import shift_losses
    from lrscale_megatron.sweep.store import SweepStore

    shift = shift_losses(db)
    store = SweepStore(db)
    try:
        runs = [r for r in store.finished_runs() if r.run_id in shift]
    finally:
        store.close()
    cols = {k: np.array([float(r.config[k]) for r in runs]) for k in ("width", "depth", "params", "tokens")}
    return RunTable(
        **cols,
        batch_tokens=np.array([float(r.config["batch_tokens"]) for r in runs]),
        lr=np.array([float(r.config["lr"]) for r in runs]),
        loss=np.array([shift[r.run_id] for r in runs]),
        source=f"{db} (shift loss)",
    )


def r2_mae(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    resid = y - pred
    ss = float(np.sum((y - y.mean()) ** 2))
    return (1.0 - float(np.sum(resid**2)) / ss if ss > 0 else float("nan"), float(np.mean(np.abs(resid))))


def shift_check(db: Path, method: str, regressor: str) -> dict:
    val_curves = group_curves(load_store(db, "val"))
    sh_curves = group_curves(shift_table(db))
    val_opt = {o.key: o for o in extract_optima(val_curves, method, keep_edge=True)}
    sh_opt = {o.key: o for o in extract_optima(sh_curves, method, keep_edge=True)}
    both = [k for k in val_opt if k in sh_opt and not val_opt[k].on_edge and not sh_opt[k].on_edge]
    d = np.array([np.log(sh_opt[k].eta_star / val_opt[k].eta_star) for k in both])
    grid_step = float(np.median(np.diff(np.log(val_curves[0].lr))))
    # law fitted on the training corpus (validation optima), scored on the shift corpus
    tr = [val_opt[k] for k in both]
    fit = fit_power_law(
        optima_columns(tr),
        np.array([o.eta_star for o in tr]),
        FitConfig(POWER, folds=0, bootstrap=0, regressor=regressor),
    )
    te = [sh_opt[k] for k in both]
    pred = fit.predict(optima_columns(te))
    r2, mae = r2_mae(np.log([o.eta_star for o in te]), np.log(pred))
    r2_own, mae_own = r2_mae(np.log([o.eta_star for o in tr]), np.log(fit.predict(optima_columns(tr))))
    curves = {c.key: c for c in sh_curves}
    val_on_shift = [regret_at(curves[k], val_opt[k].eta_star) for k in both]
    law_on_shift = [regret_at(curves[k], float(p)) for k, p in zip(both, pred)]
    return {
        "groups_compared": len(both),
        "groups_total": len(val_curves),
        "edge_val": sum(o.on_edge for o in val_opt.values()),
        "edge_shift": sum(o.on_edge for o in sh_opt.values()),
        "mean_log_ratio_shift_over_val": float(d.mean()),
        "median_log_ratio": float(np.median(d)),
        "mean_abs_log_ratio": float(np.abs(d).mean()),
        "max_abs_log_ratio": float(np.abs(d).max()),
        "grid_step_log": grid_step,
        "frac_same_grid_argmin": float(
            np.mean([np.argmin(val_curves_loss(val_curves, k)) == np.argmin(curves[k].loss) for k in both])
        ),
        "law_val_fit_on_val": {"r2": r2_own, "mae_log": mae_own},
        "law_val_fit_on_shift": {"r2": r2, "mae_log": mae},
        "regret_shift_pct_using_val_eta": RegretSummary.of("val eta* on shift", val_on_shift).__dict__,
        "regret_shift_pct_using_val_law": RegretSummary.of("val law on shift", law_on_shift).__dict__,
    }


def val_curves_loss(curves: list, key) -> tuple[float, ...]:
    return next(c.loss for c in curves if c.key == key)


def curvature_cv(db: Path, method: str, folds: int, regressor: str, precondition: bool = False) -> dict:
    """Grouped-CV comparison; ``precondition`` uses Adam-preconditioned lambda_max (``init_lambda_max_adam``)."""
    from lrscale_megatron.sweep.curvature import load_lambdas

    lam = load_lambdas(db, precondition)
    table = load_store(db, "val")
    from lrscale_megatron.sweep.store import SweepStore

    store = SweepStore(db)
    try:
        seqs = {int(r.config["seq_len"]) for r in store.finished_runs()}
    finally:
        store.close()
    if len(seqs) != 1:
        raise ValueError(f"sweep has seq_len values {seqs}; fix: analyse one seq_len at a time")
    s = seqs.pop()
    optima: list[Optimum] = [
        o
        for o in extract_optima(group_curves(table), method)
        if (int(o.key.width), int(o.key.depth), int(o.key.batch_tokens), s) in lam
    ]
    lam_col = np.array(
        [lam[(int(o.key.width), int(o.key.depth), int(o.key.batch_tokens), s)] for o in optima]
    )
    cols = optima_columns(optima, extra={"lambda_max": lam_col.tolist()})
    eta = np.array([o.eta_star for o in optima])
    y = np.log(eta)
    groups = nd_groups(optima)
    cfg = FitConfig(POWER, folds=folds, bootstrap=0, regressor=regressor)
    out: dict = {"n_optima": len(optima), "n_lambda_groups": len(lam), "folds": folds}
    for name, preds in (
        ("power law width,depth,tokens,batch", POWER),
        ("c * lambda_max^e", ("lambda_max",)),
        ("c * lambda_max^e * tokens^f", ("lambda_max", "tokens")),
        ("c * lambda_max^e * tokens^f * batch^g", ("lambda_max", "tokens", "batch")),
    ):
        c = FitConfig(preds, folds=folds, bootstrap=0, regressor=regressor)
        cv = cross_validate(_log_design(cols, preds), y, c, groups)
        full = fit_power_law(cols, eta, c, groups, check=False)
        out[name] = {
            "r2": cv.r2 if cv else None,
            "mae_log": cv.mae_log if cv else None,
            "grouped": cv.grouped if cv else None,
            "exponents": full.exponents,
            "coefficient": float(np.exp(full.log_c)),
        }
    # kappa / lambda_max with exponent fixed at -1: same grouped folds as cross_validate
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    pred = np.empty_like(y)
    log_kl = y + np.log(lam_col)
    for tr, te in GroupKFold(n_splits=cfg.folds).split(y, y, codes):
        pred[te] = float(np.mean(log_kl[tr])) - np.log(lam_col[te])
    r2, mae = r2_mae(y, pred)
    out["kappa / lambda_max"] = {"r2": r2, "mae_log": mae, "kappa": float(np.exp(log_kl.mean()))}
    out["_points"] = [
        {
            "width": o.key.width,
            "depth": o.key.depth,
            "tokens": o.key.tokens,
            "batch": o.key.batch_tokens,
            "eta_star": o.eta_star,
            "lambda_max": float(lam_col[i]),
        }
        for i, o in enumerate(optima)
    ]
    return out


def plot_curvature(raw: dict, adam: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, res, label in (
        (axes[0], raw, "lambda_max at init (Lanczos, exact HVP)"),
        (axes[1], adam, "Adam-preconditioned lambda_max at init"),
    ):
        pts = res["_points"]
        sc = ax.scatter(
            [p["lambda_max"] for p in pts],
            [p["eta_star"] for p in pts],
            c=[np.log2(p["batch"]) for p in pts],
            marker="o",
            cmap="viridis",
        )
        lam = np.geomspace(min(p["lambda_max"] for p in pts), max(p["lambda_max"] for p in pts), 20)
        k = res["kappa / lambda_max"]["kappa"]
        r2 = res["kappa / lambda_max"]["r2"]
        ax.plot(lam, k / lam, "k--", lw=0.8, label=f"kappa/lambda, kappa={k:.3g}, CV R2={r2:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("measured eta*")
        ax.legend(fontsize=7)
    fig.colorbar(sc, ax=axes, label="log2 batch tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/sweep/cpu-sweep.json"))
    ap.add_argument("--store", default=None, help="default: the sweep config's store")
    ap.add_argument("--measure", action="store_true", help="measure missing lambda_max at init first")
    ap.add_argument("--method", default="argmin", help="eta* extraction (the shipped law's: argmin)")
    ap.add_argument("--regressor", default="ols", help="the shipped law's: ols")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lrscale_megatron.sweep.cli import load_sweep_config

    sc = load_sweep_config(args.config)
    db = Path(args.store) if args.store else sc.store
    if args.measure:
        from lrscale_megatron.launch import shutdown
        from lrscale_megatron.sweep.curvature import measure_store

        measure_store(db, sc.settings, sc.grid.expand())
        measure_store(db, sc.settings, sc.grid.expand(), precondition=True)
        shutdown()
    res: dict[str, Any] = {
        "shift": shift_check(db, args.method, args.regressor),
        "curvature": curvature_cv(db, args.method, args.folds, args.regressor),
        "curvature_adam": curvature_cv(db, args.method, args.folds, args.regressor, precondition=True),
    }
    if args.plot:
        plot_curvature(res["curvature"], res["curvature_adam"], Path(args.plot))
    pts = res["curvature"].pop("_points")
    pts_adam = res["curvature_adam"].pop("_points")
    for p, q in zip(pts, pts_adam, strict=True):
        p["lambda_max_adam"] = q["lambda_max"]
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "points": pts}, indent=1) + "\n")


if __name__ == "__main__":
    main()
