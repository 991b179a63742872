"""``lrscale fit`` and ``lrscale predict``.

    lrscale fit --steplaw-csv dense_lr_bs_loss.csv --predictors params,tokens,batch --out law.json --plots docs/img
    lrscale fit --store runs/sweep.db --predictors params,tokens --out law.json
    lrscale fit --steplaw-csv dense_lr_bs_loss.csv --select regret --out law.json   # method by CV regret
    lrscale predict --params 1.3e9 --tokens 1e11 --batch-tokens 4e6 --law law.json --json

Wire into a parser with :func:`add_subcommands`; each subcommand sets ``func`` to its handler, which
returns the process exit code (0 ok, 2 input error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
from dataclasses import replace
from typing import TextIO

import numpy as np

from lrscale_megatron.law.data import PREDICTORS, DataError, RunTable, load_steplaw_csv, load_store
from lrscale_megatron.law.evaluate import select_by_regret
from lrscale_megatron.law.fit import CollinearityError, FitConfig, ablation, optima_columns
from lrscale_megatron.law.lawfile import LawFileError, load_law
from lrscale_megatron.law.optimum import METHODS, group_curves
from lrscale_megatron.law.pipeline import fit_law, nd_groups
from lrscale_megatron.law.predict import predict, prediction_to_json

logger = logging.getLogger(__name__)

DEFAULT_LAW = "steplaw-dense"


def _predictors(text: str) -> tuple[str, ...]:
    preds = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in preds if p not in PREDICTORS]
    if bad or not preds:
        raise argparse.ArgumentTypeError(
            f"--predictors: unknown {bad or text!r}; fix: a comma list of {','.join(PREDICTORS)}"
        )
    return preds


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fit`` and ``predict`` to an ``argparse`` subparsers object."""
    f = subparsers.add_parser("fit", help="fit a learning-rate power law to sweep results")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--steplaw-csv", help="Step Law release CSV (dense_lr_bs_loss.csv format)")
    src.add_argument("--store", help="sweep store database (lrscale_megatron.sweep.store)")
    f.add_argument(
        "--predictors",
        type=_predictors,
        default=("params", "tokens", "batch"),
        help="comma list of " + ",".join(PREDICTORS),
    )
    f.add_argument("--out", help="write the law file here")
    f.add_argument("--name", default=None, help="law name (default: the --out file stem)")
    f.add_argument("--plots", help="write PNG figures into this directory")
    f.add_argument("--folds", type=int, default=5, help="k of grouped k-fold CV (0 = none)")
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--method", choices=METHODS, default="parabola", help="eta* extraction per LR sweep")
    f.add_argument("--regressor", choices=("huber", "ols"), default="huber")
    f.add_argument(
        "--select",
        choices=("none", "regret"),
        default="none",
        help="regret: choose --method and --regressor by leave-one-(params, tokens)-out mean regret "
        "over every combination (overrides both; the scores go into the law's provenance)",
    )
    f.add_argument("--date", default=None, help="provenance date (default: today, ISO)")
    f.set_defaults(func=run_fit)

    p = subparsers.add_parser("predict", help="predict the peak LR of a model")
    p.add_argument("--params", type=float, required=True, help="non-embedding parameters")
    p.add_argument("--tokens", type=float, required=True, help="training tokens")
    p.add_argument("--batch-tokens", type=float, default=None, help="tokens per optimizer step")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--depth", type=float, default=None)
    p.add_argument(
        "--law", default=DEFAULT_LAW, help=f"shipped law name or law file path (default {DEFAULT_LAW})"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--decay-style", default="cosine", help="decay_style of the written scheduler block")
    p.add_argument("--warmup-fraction", type=float, default=0.01, help="warmup steps / total steps (block)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="min_lr / peak_lr (block)")
    p.set_defaults(func=run_predict)


def _table(args: argparse.Namespace) -> RunTable:
    return load_steplaw_csv(args.steplaw_csv) if args.steplaw_csv else load_store(args.store)


def run_fit(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Handler of ``lrscale fit``."""
    try:
        table = _table(args)
        config = FitConfig(
            args.predictors,
            folds=args.folds,
            bootstrap=args.bootstrap,
            seed=args.seed,
            regressor=args.regressor,
        )
        name = args.name or (args.out.rsplit("/", 1)[-1].removesuffix(".json") if args.out else "fitted")
        prov = {
            "data": args.steplaw_csv or args.store,
            "date": args.date or datetime.date.today().isoformat(),
            "command": "lrscale "
            + " ".join(shlex.quote(a) for a in (getattr(args, "argv", None) or sys.argv[1:])),
        }
        method = args.method
        if args.select == "regret":
            sel = select_by_regret(group_curves(table), config)
            method, config = sel.method, replace(config, regressor=sel.regressor)
            prov["selection"] = {
                "by": "leave-one-(params, tokens)-out mean regret, %",
                "chosen": f"{sel.method}+{sel.regressor}",
                "scores": {f"{m}+{r}": round(v, 4) for (m, r), v in sel.scores.items()},
            }
            print(
                f"selected {sel.method} + {sel.regressor} by leave-one-(params, tokens)-out regret: "
                + ", ".join(f"{m}+{r} {v:.3f}%" for (m, r), v in sel.scores.items()),
                file=out,
            )
        fitted = fit_law(table, config, name, prov, method=method)
    except CollinearityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    law, fit = fitted.law, fitted.fit
    print(
        f"law {law.name}: eta* = {law.coefficient:.4g} * "
        + " * ".join(f"{p}^{e:+.4f}" for p, e in law.exponents.items()),
        file=out,
    )
    print(f"{fit.n_points} optima ({method}), {fit.regressor}; {fit.collinearity.explain()}", file=out)
    print(
        f"{'':10s} {'estimate':>10s} {'CI lo':>10s} {'CI hi':>10s}   ({100 * fit.ci_level:.0f}% bootstrap, B={args.bootstrap})",
        file=out,
    )
    print(
        f"{'c':10s} {law.coefficient:10.4g} {np.exp(fit.ci['log_c'][0]):10.4g} {np.exp(fit.ci['log_c'][1]):10.4g}",
        file=out,
    )
    for p in fit.predictors:
        print(f"{p:10s} {fit.exponents[p]:10.4f} {fit.ci[p][0]:10.4f} {fit.ci[p][1]:10.4f}", file=out)
    if fit.cv:
        kind = "grouped by (params, tokens)" if fit.cv.grouped else "shuffled"
        print(
            f"CV {fit.cv.folds}-fold {kind}: R2(log eta*) = {fit.cv.r2:.3f}, MAE(log eta*) = {fit.cv.mae_log:.3f}",
            file=out,
        )
        eta = np.array([o.eta_star for o in fitted.optima])
        print("ablation (drop one predictor):", file=out)
        for row in ablation(optima_columns(fitted.optima), eta, config, nd_groups(fitted.optima)):
            print(
                f"  drop {str(row.dropped):8s} R2 = {row.r2:7.3f} (delta {row.delta_r2:+.3f})  MAE = {row.mae_log:.3f}",
                file=out,
            )
    if law.batch_law:
        print(
            f"batch law: batch_tokens* = {law.batch_law.coefficient:.4g} * tokens^{law.batch_law.exponents['tokens']:.4f}",
            file=out,
        )
    if args.out:
        print(f"wrote {law.save(args.out)}", file=out)
    if args.plots:
        from lrscale_megatron.law.plots import plot_loss_vs_lr, plot_predicted_vs_measured

        a = plot_loss_vs_lr(fitted.curves, fitted.optima, f"{args.plots}/{law.name}-loss-vs-lr.png")
        b = plot_predicted_vs_measured(law, fitted.optima, f"{args.plots}/{law.name}-pred-vs-meas.png")
        print(f"wrote {a} {b}", file=out)
    return 0


def _scheduler_params(args: argparse.Namespace, pred) -> dict:
    """The rest of a ready-to-use LRScale block: total steps = tokens / batch tokens (the given batch,
    else the law's suggestion), linear warmup over ``--warmup-fraction`` of them, decay to
    ``--min-lr-ratio`` x peak; validated by the scheduler's own config parser."""
    from lrscale_megatron.scheduler import LRScaleConfig

    batch = args.batch_tokens if args.batch_tokens is not None else pred.batch_tokens
    if batch is None or batch <= 0:
        return {}
    total = max(2, round(args.tokens / batch))
    params = {
        "min_lr": pred.peak_lr * args.min_lr_ratio,
        "warmup_steps": max(1, min(total - 1, round(args.warmup_fraction * total))),
        "total_steps": total,
        "decay_style": args.decay_style,
    }
    LRScaleConfig.from_dict({"peak_lr": pred.peak_lr, **params}, where="deepspeed_scheduler.params")
    return params


def run_predict(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Handler of ``lrscale predict``."""
    try:
        law = load_law(args.law)
        pred = predict(
            law,
            params=args.params,
            tokens=args.tokens,
            batch_tokens=args.batch_tokens,
            width=args.width,
            depth=args.depth,
        )
    except (LawFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        doc = prediction_to_json(pred, **_scheduler_params(args, pred))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc), file=out)
        return 0
    print(
        f"peak_lr = {pred.peak_lr:.4g}  (interval {pred.interval[0]:.4g} .. {pred.interval[1]:.4g}; law {law.name})",
        file=out,
    )
    if pred.batch_tokens is not None:
        print(f"suggested batch_tokens = {pred.batch_tokens:.4g}", file=out)
    for w in pred.warnings:
        print(f"warning: {w}", file=out)
    print("deepspeed scheduler: " + json.dumps(doc["deepspeed_scheduler"]), file=out)
    return 0
