"""PNG figures of a comparison: loss, LR and lambda_max against the iteration, one colour per arm.

Matplotlib with the ``Agg`` backend (no display). Seeds of one arm share its colour (one line each).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lrscale_megatron.compare.runner import CompareRuns

FILES = ("loss.png", "lr.png", "lambda_max.png")


def _arm_histories(runs: CompareRuns, rep: dict[str, Any]) -> dict[str, list[list[dict[str, Any]]]]:
    """Per arm, the histories of its reported runs (the grid: its best LR only)."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for arm, by_lr in runs.arms.items():
        if arm == "cosine_grid_best" and rep.get("grid"):
            seeds = by_lr[rep["grid"]["best_lr"]]
        else:
            (seeds,) = by_lr.values()
        out[arm] = [r["history"] for r in seeds]
    return out


def write_plots(runs: CompareRuns, rep: dict[str, Any], out: Path, dpi: int = 110) -> list[str]:
    """Write :data:`FILES` into ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = _arm_histories(runs, rep)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {arm: colors[i % len(colors)] for i, arm in enumerate(hists)}

    # 1. Loss: training loss (thin) and validation loss (markers) per seed; the target as a line.
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, hs in hists.items():
        for i, h in enumerate(hs):
            label = arm if i == 0 else None
            ax_t.plot(
                [r["step"] for r in h],
                [r["train_loss"] for r in h],
                color=color[arm],
                lw=0.7,
                alpha=0.7,
                label=label,
            )
            ev = [r for r in h if r.get("val_loss") is not None]
            ax_v.plot(
                [r["step"] for r in ev],
                [r["val_loss"] for r in ev],
                "o-",
                ms=2.5,
                color=color[arm],
                lw=1,
                label=label,
            )
    ax_v.axhline(rep["target_loss"], color="k", ls="--", lw=0.8, label=f"target {rep['target_loss']:.3f}")
    ax_t.set(xlabel="iteration", ylabel="train loss (nats/token)", title="training loss")
    ax_v.set(xlabel="iteration", ylabel="validation loss (nats/token)", title="validation loss")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / FILES[0], dpi=dpi)
    plt.close(fig)

    # 2. LR per iteration (every seed: the online arm's LR depends on its measurements). Prodigy's LR is
    # a multiplier of the step size it estimates (1.0), not comparable: left out and named.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, hs in hists.items():
        if arm == "prodigy":
            ax.text(0.02, 0.02, "prodigy: LR multiplier 1.0, not shown", transform=ax.transAxes, fontsize=8)
            continue
        for i, h in enumerate(hs):
            ax.plot(
                [r["step"] for r in h],
                [r["lr"] for r in h],
                color=color[arm],
                lw=1,
                label=(arm + (" (base LR; warmup inside the optimizer)" if arm == "schedulefree" else ""))
                if i == 0
                else None,
            )
    ax.set(xlabel="iteration", ylabel="learning rate", yscale="log", title="learning rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / FILES[1], dpi=dpi)
    plt.close(fig)

    # 3. lambda_max where an arm measured it (LRScale online); other arms are named as not measured.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = []
    for arm, hs in hists.items():
        for i, h in enumerate(hs):
            pts = [(r["step"], r["lambda_max"]) for r in h if r.get("lambda_max") is not None]
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            if pts:
                measured.append(arm)
                style = ("o-", "s--", "^:", "d-.")[i % 4]
                ax.plot(*zip(*pts), style, ms=3, color=color[arm], label=f"{arm}, seed #{i + 1}")
    missing = [a for a in hists if a not in measured]
    if missing:
        ax.text(
            0.02,
            0.02,
            "not measured (no online adaptation): " + ", ".join(missing),
            transform=ax.transAxes,
            fontsize=8,
            va="bottom",
        )
    ax.set(xlabel="iteration", ylabel="top Hessian eigenvalue (held batch)", title="lambda_max")
    if measured:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / FILES[2], dpi=dpi)
    plt.close(fig)
    return list(FILES)
