"""Does online adaptation (the gauge policy) earn its keep? Rescue, no harm, too low, spike, kappa/lambda.

    python benchmarks/online_policy.py configs/compare/online-bench.json --json out/online-policy.json
    python benchmarks/online_policy.py configs/compare/online-bench.json --cases grid rescue noharm
    python benchmarks/online_policy.py configs/compare/online-bench.json --quick     # smoke: 1 seed, 12 its

One process, CPU. Every run is one :func:`lrscale_megatron.train.train` call through ``lrscale compare``'s
runner (``run_one``), so runs are cached under ``<output_dir>/runs/`` by the hash of their full train config
and a rerun only trains what is missing. Cases (``--cases``), each over the config's seeds:

* ``grid``: cosine (DeepSpeed WarmupCosineLR) at each ``grid.lrs``: the grid's best peak ``best`` and its mean
  final validation loss ``L*`` (every other case needs it);
* ``rescue``: LRScale offline and online at ``4 x best`` and ``10 x best`` (target: online within 2 % of ``L*``,
  offline not);
* ``noharm``: offline and online at ``best`` (target: online within 1 % of offline);
* ``toolow``: offline and online with ``combine="max"`` (rising allowed) at ``best / 4``: reported;
* ``spike``: the gauge in monitor-only mode (``cut_above`` = 1e12: measures, never acts) at ``10 x`` and
  ``30 x best``, measuring every 5 iterations: the first step where ``g > 1`` against the first loss spike
  (train loss > 1.2 x its running minimum after warmup);
* ``trace``: the monitor-only gauge at every warmup iteration at ``best / 4`` to ``10 x best`` (what a warmup
  rule can read: lambda(t), the gauge and the gauge projected to the peak);
* ``overhead``: the online arm at the scheduler's defaults over ``--overhead-steps`` iterations (seed 0),
  alternating with the offline arm (``--overhead-repeats`` pairs, always re-trained): the end-to-end wall-clock
  ratio, and the measurement iterations' excess over the run's median iteration;
* ``demo``: the config's own LRScale arms (its law's peak and online block), e.g. ``configs/compare/cpu-demo.json``:
  online vs offline final loss, and the online arm's wall-clock overhead;
* ``kappa``: the curvature predictor. Proxy ladder: the train model at widths 32 and 48 (the target is
  the config's model), a 4-point cosine grid each (seed 0) in monitor-only online mode, so every run records
  the preconditioned lambda_max at the end of warmup; ``kappa = calibrate_kappa`` over (each proxy's lambda
  at its own optimal LR, that LR). On the target: lambda at the end of warmup of a monitor-only run at the
  law's peak gives ``eta_curv = kappa / lambda``; regret (final loss / ``L*`` - 1) of the law's peak alone,
  of ``eta_curv`` and of ``max(eta_pred, eta_curv)`` (offline runs at each), and of the scheduler option
  (``online.kappa``, gauge policy on).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MONITOR_ONLY = {"cut_above": 1e12, "combine": "min"}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


class Bench:
    """Runs (cached) and summaries for one compare config."""

    def __init__(self, cfg: Any, force: bool = False) -> None:
        self.cfg = cfg
        self.runs_dir = Path(cfg.output_dir) / "runs"
        self.force = force
        self.trained = 0

    def variant(
        self, online: dict[str, Any] | None = None, overrides: tuple[str, ...] = (), **lrscale: Any
    ) -> Any:
        from lrscale_megatron.compare.config import LRScaleArmConfig

        base = self.cfg.lrscale
        on = {**base.online, **(online or {})}
        arm = LRScaleArmConfig(
            law=None, peak_lr=lrscale.get("peak_lr", 1e-3), decay_style=base.decay_style, online=on
        )
        return self.cfg.replace(
            lrscale=arm.model_dump(), overrides=list(self.cfg.overrides) + list(overrides)
        )

    def run(
        self,
        schedule: str,
        peak: float,
        seed: int,
        online: dict[str, Any] | None = None,
        overrides: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        from lrscale_megatron.compare.arms import RunSpec
        from lrscale_megatron.compare.runner import run_one

        cfg = self.variant(online, overrides, peak_lr=peak)
        t0 = time.perf_counter()
        res, trained = run_one(cfg, RunSpec(schedule, float(peak), seed), self.runs_dir, force=self.force)
        self.trained += int(trained)
        logging.info(
            "%s lr=%.4g seed=%d online=%s overrides=%s: final val %.4f (%s, %.0f s)",
            schedule,
            peak,
            seed,
            online,
            list(overrides),
            res["final_val_loss"],
            "trained" if trained else "cached",
            time.perf_counter() - t0,
        )
        return res

    def seeds(self, schedule: str, peak: float, **kw: Any) -> list[dict[str, Any]]:
        return [self.run(schedule, peak, s, **kw) for s in self.cfg.seeds]


def _final(rs: list[dict[str, Any]]) -> dict[str, Any]:
    v = [float(r["final_val_loss"]) for r in rs]
    return {"mean": statistics.fmean(v), "per_seed": v}


def _decisions(r: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("step", "lr", "lambda_max", "gauge", "action", "peak_after")
    return [{k: a.get(k) for k in keys} for a in r.get("adaptations", [])]


def case_grid(b: Bench) -> dict[str, Any]:
    by_lr = {lr: _final(b.seeds("cosine", lr)) for lr in b.cfg.grid.lrs}
    best = min(by_lr, key=lambda lr: by_lr[lr]["mean"])
    return {
        "by_lr": {f"{lr:g}": v for lr, v in by_lr.items()},
        "best_lr": best,
        "best_loss": by_lr[best]["mean"],
    }


def _pair(b: Bench, peak: float, best_loss: float, online: dict[str, Any] | None = None) -> dict[str, Any]:
    off, on = b.seeds("lrscale", peak), b.seeds("lrscale_online", peak, online=online)
    fo, fn = _final(off), _final(on)
    return {
        "peak": peak,
        "offline": fo,
        "online": fn,
        "offline_over_best": fo["mean"] / best_loss,
        "online_over_best": fn["mean"] / best_loss,
        "online_over_offline": fn["mean"] / fo["mean"],
        "online_decisions": [_decisions(r) for r in on],
        "online_final_peak": [(r["adaptations"] or [{}])[-1].get("peak_after") for r in on],
    }


def case_rescue(b: Bench, grid: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for m in (4, 10):
        p = _pair(b, m * grid["best_lr"], grid["best_loss"])
        p["online_within_2pct_of_best"] = p["online_over_best"] <= 1.02
        p["offline_within_2pct_of_best"] = p["offline_over_best"] <= 1.02
        out[f"x{m}"] = p
    return out


def case_noharm(b: Bench, grid: dict[str, Any]) -> dict[str, Any]:
    p = _pair(b, grid["best_lr"], grid["best_loss"])
    p["online_within_1pct_of_offline"] = p["online_over_offline"] <= 1.01
    return p


def case_toolow(b: Bench, grid: dict[str, Any]) -> dict[str, Any]:
    return _pair(b, grid["best_lr"] / 4, grid["best_loss"], online={"combine": "max"})


def _first_spike(history: list[dict[str, Any]], after: int, factor: float = 1.2) -> int | None:
    lo = math.inf
    for r in history:
        loss = float(r["train_loss"])
        if r["step"] > after and (not math.isfinite(loss) or loss > factor * lo):
            return int(r["step"])
        lo = min(lo, loss) if math.isfinite(loss) else lo
    return None


def case_spike(b: Bench, grid: dict[str, Any]) -> dict[str, Any]:
    warm = int(_train_value(b.cfg, "training.warmup_steps"))
    out = {}
    for m in (10, 30):
        rows = []
        for r in b.seeds("lrscale_online", m * grid["best_lr"], online={**MONITOR_ONLY, "adapt_every": 5}):
            dec = _decisions(r)
            crossed = next((d["step"] for d in dec if d["gauge"] is not None and d["gauge"] > 1.0), None)
            spike = _first_spike(r["history"], after=warm)
            rows.append(
                {
                    "first_g_above_1": crossed,
                    "first_loss_spike": spike,
                    "final_val": r["final_val_loss"],
                    "gauges": [(d["step"], d["gauge"]) for d in dec],
                }
            )
        out[f"x{m}"] = rows
    return out


def case_trace(b: Bench, grid: dict[str, Any]) -> dict[str, Any]:
    """Monitor-only gauge at every warmup iteration (``warmup_checks`` = warmup length) at ``best / 4`` to
    ``10 x best``: lambda(t), the gauge against the LR in force and the projected gauge at the peak
    ``lambda(t) * peak / threshold``, next to the train loss (what a warmup rule could read)."""
    warm = int(_train_value(b.cfg, "training.warmup_steps"))
    out = {}
    for m in (0.25, 1, 4, 10):
        peak = m * grid["best_lr"]
        rows = []
        for r in b.seeds("lrscale_online", peak, online={**MONITOR_ONLY, "warmup_checks": warm}):
            loss = {int(h["step"]): float(h["train_loss"]) for h in r["history"]}
            rows.append(
                {
                    "final_val": r["final_val_loss"],
                    "trace": [
                        {
                            "step": d["step"],
                            "lambda": d["lambda_max"],
                            "g": d["gauge"],
                            "g_peak": (d["lambda_max"] or math.nan) * peak / 38.0,
                            "loss": loss.get(int(d["step"])),
                        }
                        for d in _decisions(r)
                        if d["step"] <= warm
                    ],
                }
            )
        out[f"x{m:g}"] = {"peak": peak, "runs": rows}
    return out


def case_overhead(b: Bench, grid: dict[str, Any], steps: int, repeats: int = 2) -> dict[str, Any]:
    """The online arm at the scheduler's defaults (``adapt_every`` included) at the grid's best over a run of
    ``steps`` iterations (several measurements), end to end against the offline arm at the same peak: the
    two alternate (offline, online, offline, online, ...; ``repeats`` pairs, seed 0, always re-trained: a
    cached run's wall-clock was measured under another load). Also the measurement iterations' excess
    over the run's median iteration (:func:`~lrscale_megatron.compare.metrics.measurement_overhead`, the
    same run as its own baseline), next to the products each measurement took."""
    from lrscale_megatron.adapter import OnlineConfig
    from lrscale_megatron.compare.metrics import measurement_overhead

    long = Bench(b.cfg.replace(steps=steps, eval_every=max(1, steps // 5)), force=True)
    seed = b.cfg.seeds[0]
    rows = []
    for rep in range(repeats):
        load = _uptime()
        off = long.run("lrscale", grid["best_lr"], seed)
        r = long.run(
            "lrscale_online", grid["best_lr"], seed, online={"adapt_every": OnlineConfig().adapt_every}
        )
        rows.append(
            {
                "repeat": rep,
                "seed": seed,
                "load_before": load,
                "load_after": _uptime(),
                "final_val": r["final_val_loss"],
                "final_val_offline": off["final_val_loss"],
                "wall_s": r["wall_s"],
                "wall_s_offline": off["wall_s"],
                "end_to_end_ratio": r["wall_s"] / off["wall_s"],
                "overhead": measurement_overhead(r["history"]),
                "measurements": [
                    (a["step"], a["n_matvec"], a["accepted"], a["action"]) for a in r["adaptations"]
                ],
            }
        )
    b.trained += long.trained
    on_w, off_w = [x["wall_s"] for x in rows], [x["wall_s_offline"] for x in rows]
    return {
        "steps": steps,
        "runs": rows,
        "end_to_end_ratio_median": statistics.median(on_w) / statistics.median(off_w),
        "end_to_end_ratio_min": min(on_w) / min(off_w),
        "load": _uptime(),
    }


def _train_value(cfg: Any, key: str) -> Any:
    from lrscale_megatron.compare.arms import base_train_raw

    raw, _ = base_train_raw(cfg)
    cur: Any = raw
    for k in key.split("."):
        cur = cur[k]
    return cur


def _lambda_after_warmup(r: dict[str, Any], warm: int) -> float | None:
    for a in r.get("adaptations", []):
        if a["step"] >= warm and a.get("accepted"):
            return float(a["lambda_max"])
    return None


def case_kappa(b: Bench, grid: dict[str, Any], law: str) -> dict[str, Any]:
    from lrscale_megatron.compare.arms import offline_peak
    from lrscale_megatron.curvature_peak import calibrate_kappa

    warm = int(_train_value(b.cfg, "training.warmup_steps"))
    width = int(_train_value(b.cfg, "model.hidden_size"))
    ladder = []
    for w in (32, 48):
        ov = (f"model.hidden_size={w}",)
        runs = {
            lr: b.run("lrscale_online", lr, 0, online=MONITOR_ONLY, overrides=ov) for lr in b.cfg.grid.lrs
        }
        best = min(runs, key=lambda lr: runs[lr]["final_val_loss"])
        lam = _lambda_after_warmup(runs[best], warm)
        ladder.append(
            {
                "width": w,
                "eta_opt": best,
                "lambda_at_opt": lam,
                "final_by_lr": {f"{lr:g}": runs[lr]["final_val_loss"] for lr in runs},
            }
        )
    fit = calibrate_kappa([(x["lambda_at_opt"], x["eta_opt"]) for x in ladder])
    law_cfg = b.cfg.replace(lrscale=b.cfg.lrscale.replace(law=law, peak_lr=None).model_dump())
    eta_pred = offline_peak(law_cfg).peak_lr
    probe = b.seeds("lrscale_online", eta_pred, online=MONITOR_ONLY)
    lams = [_lambda_after_warmup(r, warm) for r in probe]  # per seed: one run measures one lambda
    curv = [fit.kappa / lam if lam else math.nan for lam in lams]
    best_loss = grid["best_loss"]
    res: dict[str, Any] = {
        "target_width": width,
        "ladder": ladder,
        "kappa": fit.kappa,
        "kappa_spread": fit.spread,
        "law": law,
        "eta_pred": eta_pred,
        "target_lambda_after_warmup": lams,
        "eta_curv": curv,
        "eta_max": [max(eta_pred, c) for c in curv],
        "grid_best_lr": grid["best_lr"],
    }
    for name, peaks in (("law", [eta_pred] * len(curv)), ("curv", curv), ("max", res["eta_max"])):
        f = _final([b.run("lrscale", p, s) for p, s in zip(peaks, b.cfg.seeds)])
        res[f"regret_{name}"] = f["mean"] / best_loss - 1
        res[f"final_{name}"] = f
    opt = b.seeds("lrscale_online", eta_pred, online={"kappa": fit.kappa, "combine": "max"})
    sched = _final(opt)
    res["scheduler_kappa_option_decisions"] = [_decisions(r) for r in opt]
    res["regret_scheduler_kappa_option"] = sched["mean"] / best_loss - 1
    res["final_scheduler_kappa_option"] = sched
    return res


def case_demo(b: Bench) -> dict[str, Any]:
    """The config's own LRScale arms (law peak, its online block): online vs offline, and the online
    arm's wall-clock overhead (paired totals and the measurement steps' excess, as the compare report)."""
    from lrscale_megatron.compare.arms import offline_peak
    from lrscale_megatron.compare.metrics import measurement_overhead

    peak = offline_peak(b.cfg).peak_lr
    off, on = b.seeds("lrscale", peak), b.seeds("lrscale_online", peak)
    fo, fn = _final(off), _final(on)
    return {
        "peak": peak,
        "online_block": dict(b.cfg.lrscale.online),
        "offline": fo,
        "online": fn,
        "online_over_offline": fn["mean"] / fo["mean"],
        "online_within_1pct_of_offline": fn["mean"] / fo["mean"] <= 1.01,
        "paired_wall_overhead": [o["wall_s"] / f["wall_s"] - 1 for o, f in zip(on, off)],
        "measured_steps_overhead": [measurement_overhead(o["history"]) for o in on],
        "online_decisions": [_decisions(r) for r in on],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--cases", nargs="+", default=["grid", "rescue", "noharm", "toolow", "spike", "kappa"])
    ap.add_argument("--law", default="steplaw-dense", help="law of eta_pred for the kappa case")
    ap.add_argument("--json", default=None)
    ap.add_argument("--overhead-steps", type=int, default=5000, help="run length of the overhead case")
    ap.add_argument(
        "--overhead-repeats", type=int, default=2, help="offline/online pairs of the overhead case"
    )
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help='compare-config override, e.g. --set "seeds=[0]" (repeatable)',
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 12 iterations, grid only + noharm"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lrscale_megatron", "deepspeed", "megatron"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from lrscale_megatron.compare.config import load_compare_config
    from lrscale_megatron.launch import shutdown

    sets: list[str] = []
    if args.quick:
        ov = '["training.micro_batch_size=8","training.warmup_steps=4","training.eval_batches=1"]'
        sets = ["steps=12", "seeds=[0]", "eval_every=4", 'output_dir="out/compare/online-bench-quick"']
        sets.append(f"overrides={ov}")
    cfg = load_compare_config(args.config, sets + list(args.set))
    if args.quick:
        args.cases = ["grid", "noharm"]
    b = Bench(cfg, force=args.force)
    out: dict[str, Any] = {
        "config": args.config,
        "load_before": _uptime(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    t0 = time.perf_counter()
    try:
        grid: dict[str, Any] = {}
        if any(c != "demo" for c in args.cases):
            grid = out["grid"] = case_grid(b)
        for c in args.cases:
            if c == "demo":
                out["demo"] = case_demo(b)
            elif c == "rescue":
                out["rescue"] = case_rescue(b, grid)
            elif c == "noharm":
                out["noharm"] = case_noharm(b, grid)
            elif c == "toolow":
                out["toolow"] = case_toolow(b, grid)
            elif c == "spike":
                out["spike"] = case_spike(b, grid)
            elif c == "overhead":
                out["overhead"] = case_overhead(b, grid, args.overhead_steps, args.overhead_repeats)
            elif c == "trace":
                out["trace"] = case_trace(b, grid)
            elif c == "kappa":
                out["kappa"] = case_kappa(b, grid, args.law)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    finally:
        shutdown()
    out.update(
        load_after=_uptime(),
        wall_s=time.perf_counter() - t0,
        trained=b.trained,
        command=" ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]) if argv is None else str(argv),
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k not in ("spike",)}, indent=1, default=str)[:6000])
    return out


if __name__ == "__main__":
    main()
