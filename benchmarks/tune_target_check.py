"""Is ``lrscale tune``'s predicted peak LR good on the target? Train the target at the prediction and on
a log grid of LRs around it (each seed), and compare final validation losses.

    lrscale tune configs/tune/cpu-demo.json --out out/tune/cpu-demo                 # the prediction
    python benchmarks/tune_target_check.py configs/tune/cpu-demo.json --out out/tune/cpu-demo \
        --grid 0.0005,0.001,0.002,0.004,0.008 --seeds 0 --json out/tune/cpu-demo/check.json

Runs ``lrscale tune`` first when ``OUT/prediction.json`` is missing (``--tune``: always, timed). The
target runs go through the sweep runner (``OUT/target-check.sqlite``: resumable) as one-shape sweeps
whose base config is the target itself (same heads, data, batch, schedule; ``eval_batches`` raised to
``--eval-batches`` so the comparison is not eval noise). Prints, per seed and averaged over seeds, the
loss at the prediction, the grid's best, and their ratio (the issue-10 target: <= 1.02).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lrscale_megatron.sweep.cli import prepare_data
from lrscale_megatron.sweep.megatron import gpt_train_fn
from lrscale_megatron.sweep.runner import run_sweep
from lrscale_megatron.sweep.store import SweepStore, run_id
from lrscale_megatron.tune.config import load_tune_config
from lrscale_megatron.tune.ladder import load_target, target_sweep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="tune config")
    ap.add_argument("--out", required=True, help="the tune output directory")
    ap.add_argument("--grid", required=True, help="comma list of target LRs")
    ap.add_argument("--seeds", default="0", help="comma list of seeds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--tune", action="store_true", help="run lrscale tune even when prediction.json exists")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    tune_s = None
    if args.tune or not (out / "prediction.json").is_file():
        t0 = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "lrscale_megatron.cli",
            "tune",
            args.config,
            "--out",
            str(out),
            "--no-progress",
        ]
        subprocess.run(cmd, check=True)
        tune_s = time.monotonic() - t0
    pred = json.loads((out / "prediction.json").read_text())
    cfg = load_tune_config(args.config)
    t = load_target(cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid_lrs = sorted(float(x) for x in args.grid.split(","))
    lrs = sorted({*grid_lrs, float(f"{pred['peak_lr']:.6g}")})
    settings, configs = target_sweep(cfg, t, lrs, seeds, args.eval_batches)
    store_path = out / "target-check.sqlite"
    prepare_data(settings, t.seq_len)
    t0 = time.monotonic()
    run_sweep(
        store_path,
        configs,
        functools.partial(gpt_train_fn, settings=settings),
        workers=args.workers,
        progress=False,
    )
    check_s = time.monotonic() - t0
    store = SweepStore(store_path)
    runs = {r.run_id: r for r in store.runs()}
    store.close()
    p_lr = float(f"{pred['peak_lr']:.6g}")
    table: dict[int, dict[float, float]] = {}
    for c in configs:
        r = runs[run_id(c)]
        loss = r.final_val_loss if r.state == "finished" and r.final_val_loss is not None else float("inf")
        table.setdefault(c["seed"], {})[c["lr"]] = loss
    mean = {lr: float(np.mean([table[s][lr] for s in seeds])) for lr in lrs}
    best_lr = min(grid_lrs, key=lambda lr: mean[lr])
    doc = {
        "config": args.config,
        "predicted_lr": pred["peak_lr"],
        "interval": pred["interval"],
        "extrapolation_factor": pred["extrapolation_factor"],
        "tune_wall_s": tune_s,
        "check_wall_s": check_s,
        "losses": {str(s): {str(lr): v for lr, v in table[s].items()} for s in seeds},
        "mean_loss": {str(lr): v for lr, v in mean.items()},
        "grid_best_lr": best_lr,
        "grid_best_loss": mean[best_lr],
        "loss_at_prediction": mean[p_lr],
        "ratio_prediction_over_grid_best": mean[p_lr] / mean[best_lr],
        "prediction_rank_among_grid": int(sum(mean[lr] < mean[p_lr] for lr in grid_lrs)) + 1,
    }
    print(
        f"predicted lr {pred['peak_lr']:.4g} (interval {pred['interval'][0]:.3g}..{pred['interval'][1]:.3g})"
    )
    for lr in lrs:
        tag = " <- prediction" if lr == p_lr else (" <- grid best" if lr == best_lr else "")
        per = "  ".join(f"{table[s][lr]:.4f}" for s in seeds)
        print(f"  lr {lr:10.4g}: mean {mean[lr]:.4f}   per seed {per}{tag}")
    print(
        f"loss at prediction / grid best = {doc['ratio_prediction_over_grid_best']:.4f} "
        f"(rank {doc['prediction_rank_among_grid']} of {len(grid_lrs) + 1}); tune {tune_s} s, check {check_s:.0f} s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
