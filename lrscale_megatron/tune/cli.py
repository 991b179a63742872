"""``lrscale tune``: from a target train config to its predicted peak LR through a proxy ladder.

    lrscale tune configs/tune/cpu-demo.json --out out/tune/cpu-demo     # ladder -> sweep -> law -> LR
    lrscale tune configs/gpt/gpt3-1.3b.json --out out/tune/1.3b --dry-run   # print the ladder only
    lrscale tune configs/tune/cpu-demo.json --out out/tune/x --ladder my-ladder.json  # an edited ladder
    lrscale tune configs/tune/cluster.json --out /shared/tune/1.3b --launcher slurm   # sbatch array

Steps: derive the ladder (printed and written to ``OUT/ladder.json``, a ``configs/sweep`` config; edit
it and pass it back with ``--ladder``), run it (``OUT/sweep.sqlite``; re-running resumes, finished runs
are kept, runs killed mid-way are redone), fit the law (``OUT/law.json``), predict the target's peak LR
with its interval and extrapolation factor (``OUT/prediction.json``: the DeepSpeed ``"scheduler"`` block
and the Megatron flags). Exit codes: 0 done, 1 runs failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

from lrscale_megatron.configs.base import ConfigError

logger = logging.getLogger(__name__)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tune`` to an ``argparse`` subparsers object (handler in ``func``)."""
    s = subparsers.add_parser(
        "tune", help="predict a target's peak LR from a proxy ladder (derive, sweep, fit, predict)"
    )
    s.add_argument(
        "config", help="tune config (configs/tune/*.json) or a target train config (configs/gpt/*.json)"
    )
    s.add_argument("--out", required=True, help="output directory (ladder.json, sweep.sqlite, law.json, ...)")
    s.add_argument(
        "--ladder", default=None, help="use this (edited) ladder sweep config instead of deriving one"
    )
    s.add_argument("--launcher", choices=("local", "slurm"), default=None, help="default: the config's")
    s.add_argument("--workers", type=int, default=None, help="local worker processes (default: the config's)")
    s.add_argument("--dry-run", action="store_true", help="derive and print the ladder; train nothing")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_tune_cli)


def print_ladder(ladder_path: Path, target, out: TextIO) -> None:  # type: ignore[no-untyped-def]
    from lrscale_megatron.sweep.cli import load_sweep_config
    from lrscale_megatron.tune.ladder import approx_params

    sc = load_sweep_config(ladder_path)
    g = sc.grid
    points = g.expand()
    shapes = sorted({(p["width"], p["depth"], p["tokens"], p["batch_tokens"]) for p in points})
    print(
        f"target {target.name}: width {target.width}, depth {target.depth}, {target.params:,} non-embedding "
        f"params, {target.tokens:,} tokens, batch {target.batch_tokens} tokens, lr {target.lr:g}",
        file=out,
    )
    seeds = f" x {len(g.seeds)} seeds" if g.seeds else ""
    print(f"ladder {ladder_path}: {len(shapes)} proxies x {g.n_lr} LRs{seeds} = {len(points)} runs", file=out)
    for w, d, t, b in shapes:
        ratio = approx_params(target.width, target.depth) / approx_params(w, d)
        print(
            f"  width {w:5d} depth {d:3d} heads {w // sc.settings.head_dim:3d}  {approx_params(w, d):>12,} "
            f"(12Lh^2, target/{ratio:.3g})  tokens {t:,}  batch {b}",
            file=out,
        )
    lrs = g.lrs() if g.lr_center is None else []
    if lrs:
        print("  LRs " + " ".join(f"{x:.3g}" for x in lrs), file=out)


def run_tune_cli(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Handler of ``lrscale tune``."""
    from lrscale_megatron.sweep.cli import SweepConfigError, load_sweep_config
    from lrscale_megatron.tune.config import load_tune_config
    from lrscale_megatron.tune.ladder import derive_ladder, load_target
    from lrscale_megatron.tune.run import sweep_ladder, write_ladder

    out_dir = Path(args.out)
    try:
        cfg = load_tune_config(args.config)
        if args.launcher:
            cfg = cfg.replace(launcher=args.launcher)
        if args.workers is not None:
            cfg = cfg.replace(workers=args.workers)
        target = load_target(cfg)
        if args.ladder:
            raw = json.loads(Path(args.ladder).read_text())
            base = Path(args.ladder).parent / raw.get("base_config", "")
            raw["base_config"] = str(base.resolve())
            ladder_path = write_ladder(raw, out_dir)
        else:
            ladder_path = write_ladder(derive_ladder(cfg, target).sweep, out_dir)
        load_sweep_config(ladder_path)
    except (ConfigError, SweepConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_ladder(ladder_path, target, out)
    if args.dry_run:
        print(f"wrote {ladder_path} (dry run: nothing trained)", file=out)
        return 0
    command = "lrscale " + " ".join(shlex.quote(a) for a in (getattr(args, "argv", None) or sys.argv[1:]))
    t0 = time.monotonic()
    try:
        launch = _launcher(cfg, out_dir, not args.no_progress)
        notes = sweep_ladder(out_dir, launch, cfg.ladder.extend, cfg.fit.loss)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sweep_s = time.monotonic() - t0
    return _fit_and_report(cfg, out_dir, target, command, notes, sweep_s, out)


def _launcher(cfg, out_dir: Path, progress: bool):  # type: ignore[no-untyped-def]
    from lrscale_megatron.tune.run import run_local

    if cfg.launcher == "local":
        return lambda ladder: run_local(ladder, cfg.workers, progress)
    from lrscale_megatron.tune.slurm import run_slurm

    return lambda ladder: run_slurm(ladder, out_dir, cfg.slurm)


def _fit_and_report(
    cfg, out_dir: Path, target, command: str, notes: list[str], sweep_s: float, out: TextIO
) -> int:  # type: ignore[no-untyped-def]
    from lrscale_megatron.tune.report import (
        estimate_costs,
        fit_ladder,
        predict_target,
        true_params,
        write_outputs,
    )

    try:
        fitted = fit_ladder(cfg, out_dir, command)
        pred, factor = predict_target(fitted, target)
        counts = true_params(out_dir / "sweep.sqlite", out_dir / "ladder.json")
        costs = estimate_costs(out_dir, target, counts)
        doc = write_outputs(out_dir, fitted, pred, factor, target, costs, notes)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    law = fitted.law
    print(
        f"law: eta* = {law.coefficient:.4g} * "
        + " * ".join(f"{p}^{e:+.3f}" for p, e in law.exponents.items())
        + (f"  (CV R2 {fitted.fit.cv.r2:.3f}, {fitted.fit.cv.folds} folds)" if fitted.fit.cv else ""),
        file=out,
    )
    for o in fitted.optima:
        print(f"  proxy width {o.key.width:g} depth {o.key.depth:g}: eta* = {o.eta_star:.4g}", file=out)
    print(
        f"target peak_lr = {pred.peak_lr:.4g}  (90% interval {pred.interval[0]:.4g} .. {pred.interval[1]:.4g}; "
        f"extrapolation {factor:.3g}x the largest proxy's params)",
        file=out,
    )
    if doc["suggested_batch_tokens"] is not None:
        print(f"suggested batch_tokens = {doc['suggested_batch_tokens']:.4g}", file=out)
    c = costs
    print(
        f"cost: {c.proxy_runs} proxy runs {c.proxy_flops:.3g} FLOPs, {c.proxy_wall_s:.0f} s of run time "
        f"({sweep_s:.0f} s wall this call); one target run {c.target_flops:.3g} FLOPs, "
        f"~{c.target_wall_s_est:.0f} s (estimated) -> proxies = {c.proxy_flops / c.target_flops:.2f} target runs "
        "in FLOPs",
        file=out,
    )
    for w in doc["warnings"]:
        print(f"warning: {w}", file=out)
    print("deepspeed scheduler: " + json.dumps(doc["scheduler"]), file=out)
    print("megatron flags: " + " ".join(doc["megatron_flags"]), file=out)
    print(f"wrote {out_dir / 'law.json'} {out_dir / 'prediction.json'} {out_dir / 'ladder.json'}", file=out)
    return 0
