"""Does the GPT LR law's width exponent transfer to other architectures (issue 12)?

    python benchmarks/cross_arch.py --json out/cross_arch/report.json        # both architectures
    python benchmarks/cross_arch.py --arch mixer --seeds 0 --json out/cross_arch/mixer.json

For the causal MLP-Mixer LM (``configs/tune/mixer-cpu.json``) and the ViT on the bundled digits
(``configs/tune/vit-cpu.json``), and for the GPT's own CPU ladder (``configs/tune/cpu-demo.json``):

1. ``lrscale tune CONFIG --out out/tune/NAME`` (skipped when ``prediction.json`` exists; resumable);
2. the ladder's law refitted in ``width`` and in ``params`` (same optima method, OLS, bootstrap over
   whole proxies: :func:`lrscale_megatron.tune.report.fit_ladder`): exponent, 95 % bootstrap interval;
3. the target's peak LR predicted four ways: the architecture's own law (width, params) and the GPT's
   exponent with the coefficient refitted on the architecture's proxy optima (slope fixed, least squares
   in log space: what "transfer the exponent, not the constant" means);
4. the target trained at each prediction and on a grid of LRs (``--grid-ARCH``; same sweep runner and
   ``gpt_train_fn`` as ``lrscale tune``: the DeepSpeed engine and the LRScale scheduler), per seed;
   regret = final validation loss at an LR / the grid's best - 1 (mean over seeds).

Prints a table per architecture and writes ``--json``. Wall times and the 1-min load average at start
and end are recorded (the CPU is shared: timings are noisy).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lrscale_megatron.sweep.cli import prepare_data
from lrscale_megatron.sweep.megatron import gpt_train_fn
from lrscale_megatron.sweep.runner import run_sweep
from lrscale_megatron.sweep.store import SweepStore, run_id
from lrscale_megatron.tune.config import load_tune_config
from lrscale_megatron.tune.ladder import load_target, target_sweep
from lrscale_megatron.tune.report import fit_ladder

ROOT = Path(__file__).resolve().parents[1]
TUNE = {
    "gpt": "configs/tune/cpu-demo.json",
    "mixer": "configs/tune/mixer-cpu.json",
    "vit": "configs/tune/vit-cpu.json",
}
OUT = {"gpt": "out/tune/cpu-demo", "mixer": "out/tune/mixer-cpu", "vit": "out/tune/vit-cpu"}
GRID = {
    "mixer": "0.004,0.008,0.016,0.032,0.064,0.128,0.256,0.512",
    "vit": "0.00025,0.0005,0.001,0.002,0.004,0.008,0.016,0.032",
}
PREDICTORS = ("width", "params")


def run_tune(name: str, force: bool) -> float | None:
    """``lrscale tune`` for ``name`` unless its prediction exists; returns its wall time (s) when run."""
    out = ROOT / OUT[name]
    if not force and (out / "prediction.json").is_file():
        return None
    t0 = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "lrscale_megatron.cli",
        "tune",
        TUNE[name],
        "--out",
        str(out),
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.monotonic() - t0


def refit(name: str, predictor: str) -> dict[str, Any]:
    """The ladder's law in one predictor: exponent, its 95 % bootstrap interval, optima, CV R^2."""
    cfg = load_tune_config(ROOT / TUNE[name])
    cfg = cfg.replace(fit={**cfg.fit.model_dump(), "predictors": [predictor]})
    fitted = fit_ladder(cfg, ROOT / OUT[name], "benchmarks/cross_arch.py")
    law = fitted.law
    ci = (law.exponent_ci or {}).get(predictor, (math.nan, math.nan))
    return {
        "predictor": predictor,
        "coefficient": law.coefficient,
        "exponent": law.exponents[predictor],
        "ci95": [float(ci[0]), float(ci[1])],
        "cv_r2": fitted.fit.cv.r2 if fitted.fit.cv else None,
        "optima": [
            {"width": o.key.width, "params": o.key.params, "eta_star": o.eta_star} for o in fitted.optima
        ],
    }


def fixed_slope(optima: list[dict[str, Any]], predictor: str, exponent: float, x_target: float) -> float:
    """Peak LR at ``x_target`` of ``eta = c x^exponent``, ``c`` fitted to the optima (log least squares)."""
    x = np.array([o[predictor] for o in optima], dtype=float)
    eta = np.array([o["eta_star"] for o in optima], dtype=float)
    log_c = float(np.mean(np.log(eta) - exponent * np.log(x)))
    return float(math.exp(log_c) * x_target**exponent)


def target_runs(
    name: str, lrs: list[float], seeds: list[int], eval_batches: int, workers: int = 1
) -> dict[int, dict[float, float]]:
    """Final validation loss of the target at each LR and seed (resumable store next to the ladder)."""
    cfg = load_tune_config(ROOT / TUNE[name])
    t = load_target(cfg)
    settings, configs = target_sweep(cfg, t, lrs, seeds, eval_batches)
    store_path = ROOT / OUT[name] / "cross-arch-target.sqlite"
    prepare_data(settings, t.seq_len)
    run_sweep(
        store_path,
        configs,
        functools.partial(gpt_train_fn, settings=settings),
        workers=workers,
        progress=False,
    )
    store = SweepStore(store_path)
    runs = {r.run_id: r for r in store.runs()}
    store.close()
    table: dict[int, dict[float, float]] = {}
    for c in configs:
        r = runs[run_id(c)]
        loss = r.final_val_loss if r.state == "finished" and r.final_val_loss is not None else math.inf
        table.setdefault(int(c["seed"]), {})[float(c["lr"])] = float(loss)
    return table


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def study(
    name: str,
    gpt: dict[str, dict[str, Any]],
    seeds: list[int],
    grid: list[float],
    eval_batches: int,
    workers: int = 1,
) -> dict:
    own = {p: refit(name, p) for p in PREDICTORS}
    t = load_target(load_tune_config(ROOT / TUNE[name]))
    x_target = {"width": float(t.width), "params": float(t.params)}
    preds = {}
    for p in PREDICTORS:
        preds[f"own {p} law"] = _r(own[p]["coefficient"] * x_target[p] ** own[p]["exponent"])
        preds[f"GPT {p} exponent"] = _r(fixed_slope(own[p]["optima"], p, gpt[p]["exponent"], x_target[p]))
    lrs = sorted({*grid, *preds.values()})
    t0 = time.monotonic()
    table = target_runs(name, lrs, seeds, eval_batches, workers)
    wall = time.monotonic() - t0
    mean = {lr: float(np.mean([table[s][lr] for s in seeds])) for lr in lrs}
    best = min(grid, key=lambda lr: mean[lr])
    regret = {lr: mean[lr] / mean[best] - 1.0 for lr in lrs}
    return {
        "target": t.path,
        "target_width": t.width,
        "target_params": t.params,
        "laws": own,
        "predictions": preds,
        "seeds": seeds,
        "grid": grid,
        "losses": {str(s): {str(lr): v for lr, v in table[s].items()} for s in seeds},
        "mean_loss": {str(lr): v for lr, v in mean.items()},
        "grid_best_lr": best,
        "regret": {k: regret[v] for k, v in preds.items()},
        "target_wall_s": wall,
    }


def _print(name: str, res: dict, gpt: dict) -> None:
    print(
        f"\n== {name}: target {res['target']} (width {res['target_width']}, {res['target_params']:,} params)"
    )
    for p in PREDICTORS:
        law, g = res["laws"][p], gpt[p]
        print(
            f"  {p:6s} exponent {law['exponent']:+.3f} [{law['ci95'][0]:+.2f}, {law['ci95'][1]:+.2f}]  "
            f"(GPT {g['exponent']:+.3f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}])  CV R2 {law['cv_r2']:.2f}  "
            "optima " + " ".join(f"{o['eta_star']:.3g}" for o in law["optima"])
        )
    for lr_s, v in sorted(res["mean_loss"].items(), key=lambda kv: float(kv[0])):
        lr = float(lr_s)
        tags = [k for k, x in res["predictions"].items() if x == lr]
        tags += ["grid best"] if lr == res["grid_best_lr"] else []
        print(
            f"  lr {lr:10.4g}: val {v:.4f}  regret {v / res['mean_loss'][str(res['grid_best_lr'])] - 1:+.4f}  {', '.join(tags)}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", choices=("mixer", "vit"), help="default: both")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--grid-mixer", default=GRID["mixer"])
    ap.add_argument("--grid-vit", default=GRID["vit"])
    ap.add_argument(
        "--eval-batches", type=int, default=0, help="0: each target's own eval_batches x 4 (mixer), 11 (vit)"
    )
    ap.add_argument(
        "--tune", action="store_true", help="re-run lrscale tune even when prediction.json exists"
    )
    ap.add_argument("--workers", type=int, default=1, help="target runs in parallel (1 thread each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    archs = args.arch or ["mixer", "vit"]
    seeds = [int(s) for s in args.seeds.split(",")]
    doc: dict[str, Any] = {
        "load_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    t0 = time.monotonic()
    doc["tune_wall_s"] = {n: run_tune(n, args.tune) for n in ["gpt", *archs]}
    gpt = {p: refit("gpt", p) for p in PREDICTORS}
    doc["gpt"] = gpt
    for name in archs:
        grid = sorted(float(x) for x in getattr(args, f"grid_{name}").split(","))
        eb = args.eval_batches or {"mixer": 16, "vit": 11}[name]
        doc[name] = study(name, gpt, seeds, grid, eb, args.workers)
        _print(name, doc[name], gpt)
    doc["wall_s"] = time.monotonic() - t0
    doc["load_end"] = os.getloadavg()[0]
    print(f"\nwall {doc['wall_s']:.0f} s, load {doc['load_start']:.1f} -> {doc['load_end']:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
