"""Leave-one-(N, D)-out regret of LR laws on the Step Law CSV.

    python benchmarks/law_steplaw_cv.py [--csv ../shared/data/steplaw/dense_lr_bs_loss.subset.csv]

For each of the 15 (N, D) groups: fit on the optima of the other 14, predict the LR of each held-out
(N, D, batch) sweep, snap it to the nearest grid LR and report the relative excess of its smoothed
loss over the sweep's best (regret, %). The published Step Law formula is scored the same way (it was
fitted on the full release, so it has seen these runs). Single process, CPU only, ~10 s.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lrscale_megatron.law.data import load_steplaw_csv
from lrscale_megatron.law.evaluate import (
    RegretSummary,
    evaluate_fn,
    law_lr_fn,
    leave_one_nd_out,
    nested_leave_one_nd_out,
)
from lrscale_megatron.law.fit import FitConfig
from lrscale_megatron.law.lawfile import load_law
from lrscale_megatron.law.optimum import METHODS, group_curves

PREDICTOR_SETS = (("params", "tokens"), ("params", "tokens", "batch"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--csv",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/steplaw/dense_lr_bs_loss.subset.csv"),
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    curves = group_curves(load_steplaw_csv(args.csv))
    rows: list[tuple[str, RegretSummary, RegretSummary]] = []

    def add(name: str, regrets: list) -> None:
        interior = [g for g in regrets if not g.on_edge]
        rows.append((name, RegretSummary.of(name, regrets), RegretSummary.of(name, interior)))

    add(
        "Step Law published (1.79 N^-0.713 D^0.307)",
        evaluate_fn(curves, law_lr_fn(load_law("steplaw-published"))),
    )
    for preds in PREDICTOR_SETS:
        for method in METHODS:
            for reg in ("huber", "ols"):
                tag = (
                    " <- naive baseline" if (method, reg) == ("argmin", "huber") and "batch" in preds else ""
                )
                tag = (
                    " <- `lrscale fit` default"
                    if (method, reg) == ("parabola", "huber") and "batch" in preds
                    else tag
                )
                add(
                    f"{method:8s} + {reg:5s} [{','.join(preds)}]{tag}",
                    leave_one_nd_out(curves, method, FitConfig(preds, regressor=reg)),
                )
    cfg = FitConfig(("params", "tokens", "batch"))
    nested, picks = nested_leave_one_nd_out(curves, cfg)
    add("selected by inner LONO regret [params,tokens,batch] (nested) <- shipped", nested)
    chosen = sorted({f"{p.method}+{p.regressor}" for p in picks})
    print(
        f"{len(curves)} (N, D, batch) sweeps, {len({(c.key.params, c.key.tokens) for c in curves})} (N, D) groups; regret in %"
    )
    print(
        f"| {'law (eta* extraction + regressor [predictors])':66s} | mean | median | p90 | max | mean, interior optima only | MAE log LR |"
    )
    print(f"|{'-' * 68}|------|--------|-----|-----|-----|-----|")
    print(
        f"nested selection chose, per outer fold: {[f'{p.method}+{p.regressor}' for p in picks]} ({chosen})"
    )
    for name, s, si in rows:
        print(
            f"| {name:66s} | {s.mean:.3f} | {s.median:.3f} | {s.p90:.3f} | {s.max:.2f} | {si.mean:.3f} (n={si.n}) | {s.mae_log_lr:.3f} |"
        )


if __name__ == "__main__":
    main()
