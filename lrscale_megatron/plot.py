"""``lrscale plot LOGDIR``: PNG figures of LR, lambda_max and loss against the step.

Reads the CSV files an :class:`~lrscale_megatron.monitor.LRScaleMonitor` wrote into ``LOGDIR``
(``lrscale_steps.csv``, ``lrscale_measurements.csv``) and writes ``lrscale_lr.png``,
``lrscale_lambda_max.png``, ``lrscale_loss.png`` and ``lrscale_gauge.png`` (the gauge
``g = lambda_max * lr / threshold`` per measurement, 1 = edge of stability) into ``LOGDIR`` or ``--out``. Matplotlib runs
with the ``Agg`` backend (no display needed).

    lrscale plot runs/exp1
    lrscale plot runs/exp1 --out figures/ --dpi 150
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from lrscale_megatron.monitor import GLOBAL_GROUP, MEASUREMENTS_FILE, STEPS_FILE

logger = logging.getLogger(__name__)

FIGURES = ("lrscale_lr.png", "lrscale_lambda_max.png", "lrscale_loss.png", "lrscale_gauge.png")


def _float(s: str) -> float:
    return float(s) if s not in ("", None) else math.nan


def read_steps(path: Path) -> tuple[list[int], list[float], dict[str, list[float]]]:
    """``(iterations, losses, {lr_groupN: values})`` from ``lrscale_steps.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    lr_cols = [c for c in (rows[0].keys() if rows else []) if c.startswith("lr_group")]
    its = [int(r["iteration"]) for r in rows]
    losses = [_float(r["loss"]) for r in rows]
    return its, losses, {c: [_float(r[c]) for r in rows] for c in lr_cols}


def read_measurements(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``lrscale_measurements.csv`` grouped by ``group`` (``all`` for the global peak)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out[r["group"]].append(
                {
                    "step": int(r["step"]),
                    "lambda_max": _float(r["lambda_max"]),
                    "accepted": r["accepted"] == "1",
                    "peak_after": _float(r["peak_after"]),
                    "gauge": _float(r.get("gauge", "")),  # absent in CSVs written before the gauge
                    "action": r.get("action", ""),
                }
            )
    return dict(out)


def plot_logdir(logdir: str | Path, out: str | Path | None = None, dpi: int = 100) -> list[Path]:
    """Write the four figures; returns their paths. Raises ``FileNotFoundError`` naming the missing CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logdir = Path(logdir)
    outdir = Path(out) if out is not None else logdir
    steps_csv, meas_csv = logdir / STEPS_FILE, logdir / MEASUREMENTS_FILE
    if not steps_csv.exists() and not meas_csv.exists():
        raise FileNotFoundError(
            f"neither {steps_csv} nor {meas_csv} exists. Fix: point LOGDIR at the directory given to "
            "LRScaleMonitor(...), and attach the monitor to the scheduler (scheduler.attach_monitor)"
        )
    its, losses, lrs = read_steps(steps_csv) if steps_csv.exists() else ([], [], {})
    meas = read_measurements(meas_csv) if meas_csv.exists() else {}
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / name for name in FIGURES]

    # 1. LR per group, with the measurement steps marked.
    fig, ax = plt.subplots(figsize=(7, 4))
    for col, ys in lrs.items():
        ax.plot(its, ys, label=col.replace("lr_", ""))
    for rows in meas.values():
        for r in rows:
            ax.axvline(r["step"], color="0.85", lw=0.8, zorder=0)
    _finish(
        ax, "learning rate", "LR per param group (grey: curvature measurements)", bool(lrs), "no LR logged"
    )
    fig.savefig(paths[0], dpi=dpi)
    plt.close(fig)

    # 2. lambda_max per group: used (dots) and skipped (crosses).
    fig, ax = plt.subplots(figsize=(7, 4))
    for group, rows in sorted(meas.items()):
        name = "global" if group == GLOBAL_GROUP else f"group{group}"
        used = [(r["step"], r["lambda_max"]) for r in rows if r["accepted"]]
        skipped = [(r["step"], r["lambda_max"]) for r in rows if not r["accepted"]]
        (line,) = ax.plot([s for s, _ in used], [v for _, v in used], "o-", label=name)
        drawn = [(s, v) for s, v in skipped if math.isfinite(v) and v > 0]
        if drawn:
            ax.plot(
                [s for s, _ in drawn],
                [v for _, v in drawn],
                "x",
                color=line.get_color(),
                label=f"{name} (skipped)",
            )
        for s, v in skipped:  # NaN / Inf / non-positive: a dashed line at the step (reason in the CSV)
            if (s, v) not in drawn:
                ax.axvline(s, color=line.get_color(), ls="--", lw=0.8)
    if any(r["lambda_max"] > 0 for rows in meas.values() for r in rows if math.isfinite(r["lambda_max"])):
        ax.set_yscale("log")
    title = "top Hessian eigenvalue (x / dashed: skipped estimates)"
    _finish(ax, "lambda_max", title, bool(meas), "no curvature measurement logged")
    fig.savefig(paths[1], dpi=dpi)
    plt.close(fig)

    # 3. loss.
    fig, ax = plt.subplots(figsize=(7, 4))
    pts = [(i, v) for i, v in zip(its, losses) if math.isfinite(v)]
    if pts:
        ax.plot(*zip(*pts), lw=1.0)
    _finish(ax, "loss", "training loss", bool(pts), "no loss logged (call monitor.log_loss(loss))")
    fig.savefig(paths[2], dpi=dpi)
    plt.close(fig)

    # 4. the gauge per group, with the edge of stability (g = 1); cuts and raises marked.
    fig, ax = plt.subplots(figsize=(7, 4))
    has_gauge = False
    for group, rows in sorted(meas.items()):
        gpts = [
            (r["step"], r["gauge"], r["action"]) for r in rows if math.isfinite(r["gauge"]) and r["gauge"] > 0
        ]
        if not gpts:
            continue
        has_gauge = True
        name = "global" if group == GLOBAL_GROUP else f"group{group}"
        (line,) = ax.plot([s for s, _, _ in gpts], [g for _, g, _ in gpts], "o-", label=name)
        for mark, action in (("v", "cut"), ("^", "raise")):
            sel = [(s, g) for s, g, a in gpts if a == action]
            if sel:
                ax.plot(*zip(*sel), mark, ms=9, color=line.get_color(), label=f"{name} {action}")
    if has_gauge:
        ax.axhline(1.0, color="red", ls="--", lw=1.0, label="edge of stability (g = 1)")
        ax.set_yscale("log")
    _finish(ax, "g = lambda_max * lr / threshold", "stability gauge", has_gauge, "no gauge logged")
    fig.savefig(paths[3], dpi=dpi)
    plt.close(fig)
    logger.info("lrscale plot: wrote %s", ", ".join(str(p) for p in paths))
    return paths


def _finish(ax: Any, ylabel: str, title: str, has_data: bool, empty_note: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if has_data:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)
    ax.figure.tight_layout()


def run(args: argparse.Namespace) -> int:
    for p in plot_logdir(args.logdir, args.out, dpi=args.dpi):
        print(p)
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plot`` to the ``lrscale`` sub-commands."""
    p = subparsers.add_parser("plot", help="PNG figures of LR, lambda_max and loss from a monitor LOGDIR")
    p.add_argument("logdir", metavar="LOGDIR", help="directory given to LRScaleMonitor")
    p.add_argument("--out", default=None, help="write the PNGs here (default: LOGDIR)")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(func=run)
    return p


__all__ = ["FIGURES", "add_subcommand", "plot_logdir", "read_measurements", "read_steps", "run"]
