"""Wall-clock cost of online spectral adaptation: training with it / training without it.

    python benchmarks/online_overhead.py --preset tiny --steps 10000 --json out.json  # 7 measurements
    python benchmarks/online_overhead.py --preset small --steps 300                    # 2 (warmup checks)
    python benchmarks/online_overhead.py --adapt-every 100  # a non-default setting, for comparison
    python benchmarks/online_overhead.py --quick            # smoke run: tiny preset, 12 steps, 1 repeat

Single process, CPU (megatron-core GPTModel through ``init_megatron(1, 1)``), float32, torch AdamW,
:class:`~lrscale_megatron.scheduler.LRScaleScheduler` with ``attach_curvature`` at the scheduler's
default online settings (``OnlineConfig()``: ``adapt_every``, ``warmup_checks``, ``max_iter``, ``tol``,
``warmup_tol``, ``hvp``) unless overridden. Baseline and online runs alternate, each from the same seed and
the same pre-built batches; the ratio is taken from the median (and the min) over repeats. A step is one
optimizer iteration. ``measured_fraction`` is the time spent inside the estimator calls (timed around
each) over the online run's wall-clock: the overhead measured within one run, immune to run-to-run noise.

Two ratios are reported: the end-to-end ratio of this run (which, for a run shorter than a few
``adapt_every``, is dominated by the one measurement at the end of warmup) and the steady-state ratio of
a long run at these settings, ``1 + seconds_per_measurement / (adapt_every * seconds_per_step)``, from
the same measured per-step and per-measurement costs.

The cost of one measurement is ``n_matvec`` Hessian-vector products (Lanczos, Paige 1976; double-backward
HVP, Pearlmutter 1994). The script also reports the ``adapt_every`` at which that cost stays within the
target overhead: ``adapt_every >= seconds_per_measurement / (target_overhead * seconds_per_step)``.
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
from typing import Any

import torch

from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

TARGET = 1.02


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


def train(
    preset: Any, ctx: Any, batches: list[dict], held: dict, *, online: OnlineConfig, peak_lr: float, seed: int
) -> dict[str, Any]:
    """One timed training run; returns seconds, measurements, n_matvec and the final loss."""
    from lrscale_megatron.models.gpt import build_gpt, gpt_loss_fn

    steps = len(batches)
    model = build_gpt(preset, ctx, dtype=torch.float32, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    config = LRScaleConfig(
        total_steps=steps,
        peak_lr=peak_lr,
        min_lr=peak_lr / 10,
        warmup_steps=max(1, steps // 10),
        decay_style="cosine",
        online=online,
    )
    sched = LRScaleScheduler(opt, config)
    measure_s: list[float] = []
    # the run's clocks start before the estimator is attached: its preflight and set-up are overhead too.
    # thread CPU time (one torch thread) as well as wall-clock: on a shared machine other jobs move the
    # wall-clock of identical runs by 10 % and more, this thread's CPU time far less
    t0, c0 = time.perf_counter(), time.thread_time()
    if online.enabled:
        sched.attach_curvature(model, gpt_loss_fn, held)

        def timed(inner: Any) -> Any:  # time each measurement directly (benchmark-only access)
            def call(params):
                t = time.perf_counter()
                try:
                    return inner(params)
                finally:
                    measure_s.append(time.perf_counter() - t)

            return call

        sched.core._estimator = timed(sched.core._estimator)
        if sched.core._warmup_estimator is not None:
            sched.core._warmup_estimator = timed(sched.core._warmup_estimator)
    loss = torch.tensor(math.nan)
    iter_s: list[float] = []  # each iteration's wall-clock, measurement time excluded
    for b in batches:
        ti, n_before, m_before = time.perf_counter(), len(measure_s), sum(measure_s)
        loss = gpt_loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        iter_s.append(
            time.perf_counter() - ti - (sum(measure_s) - m_before if len(measure_s) > n_before else 0.0)
        )
    seconds, cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "measurements": len(sched.history),
        "n_matvec": sum(int(h.get("n_matvec", 0)) for h in sched.history),
        "n_matvec_each": [int(h.get("n_matvec", 0)) for h in sched.history],
        "accepted": sum(bool(h["accepted"]) for h in sched.history),
        "accepted_each": [bool(h["accepted"]) for h in sched.history],
        "final_loss": float(loss.detach()),
        "final_peak_lr": sched.peak_lr,
        "measurement_seconds": measure_s,
        "measurement_steps": [int(h["step"]) for h in sched.history],
        "measurement_iterations": _in_iterations(measure_s, [int(h["step"]) for h in sched.history], iter_s),
        "iteration_seconds_median": statistics.median(iter_s) if iter_s else math.nan,
    }


#: iterations each side of a measurement whose median wall-clock is its local unit of time
WINDOW = 50


def _in_iterations(measure_s: list[float], steps: list[int], iter_s: list[float]) -> list[float]:
    """Each measurement's wall-clock in units of the median training iteration around it (``WINDOW`` each
    side, measurement time excluded): a same-process, interleaved baseline, so a load change between runs
    (or over a long run) does not enter the ratio; a load spike inside one measurement still does."""
    out = []
    for t, step in zip(measure_s, steps):
        near = iter_s[max(0, step - 1 - WINDOW) : step - 1 + WINDOW]
        out.append(t / statistics.median(near) if near else math.nan)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3000, help="optimizer iterations per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-lr", type=float, default=1e-3)
    ap.add_argument("--adapt-every", type=int, default=None, help="default: OnlineConfig().adapt_every")
    ap.add_argument("--max-iter", type=int, default=None, help="default: OnlineConfig().max_iter")
    ap.add_argument("--cold", action="store_true", help="warm_start=False (each measurement from random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 12 steps, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.repeats = "tiny", 12, 1
    logging.basicConfig(level=logging.WARNING)

    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.models.gpt import get_preset
    from lrscale_megatron.models.text import byte_batch

    overrides: dict[str, Any] = {
        k: v for k, v in (("adapt_every", args.adapt_every), ("max_iter", args.max_iter)) if v
    }
    if args.cold:
        overrides["warm_start"] = False
    online = OnlineConfig(enabled=True, **overrides)
    offline = OnlineConfig()
    preset = get_preset(args.preset)
    load_before = _uptime()
    ctx = init_megatron(1, 1, seed=args.seed)
    try:
        mbs, seq = preset.micro_batch_size, preset.seq_length
        batches = [byte_batch(mbs, seq, seed=args.seed + 1 + i) for i in range(args.steps)]
        held = byte_batch(mbs, seq, seed=args.seed + 10**6)
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "online": []}
        for r in range(args.repeats):
            for name, oc in (("baseline", offline), ("online", online)):
                res = train(preset, ctx, batches, held, online=oc, peak_lr=args.peak_lr, seed=args.seed)
                runs[name].append(res)
                print(
                    f"repeat {r} {name:8s} {res['seconds']:.2f}s (thread cpu {res['cpu_seconds']:.2f}s) "
                    f"measurements={res['measurements']} "
                    f"n_matvec={res['n_matvec']} loss={res['final_loss']:.4f}",
                    flush=True,
                )
    finally:
        shutdown()
    load_after = _uptime()

    base = [x["seconds"] for x in runs["baseline"]]
    onl = [x["seconds"] for x in runs["online"]]
    med_b, med_o = statistics.median(base), statistics.median(onl)
    n_meas = runs["online"][0]["measurements"]
    n_mv = runs["online"][0]["n_matvec"]
    step_s = med_b / args.steps
    timed = [t for x in runs["online"] for t in x["measurement_seconds"]]
    meas_s = statistics.median(timed) if timed else math.nan  # timed directly around each measurement
    fractions = [sum(x["measurement_seconds"]) / x["seconds"] for x in runs["online"]]
    # the same overhead in local iteration units: sum of measurements' cost in iterations / iterations
    in_iters = [sum(x["measurement_iterations"]) / args.steps for x in runs["online"]]
    per_meas = [t for x in runs["online"] for t in x["measurement_iterations"]]
    hvp_s = meas_s * n_meas / n_mv if n_mv else math.nan
    target_overhead = TARGET - 1.0
    need = meas_s / (target_overhead * step_s) if n_meas and meas_s > 0 else math.nan
    out = {
        "preset": preset.name,
        "params": preset.num_params(),
        "steps": args.steps,
        "repeats": args.repeats,
        "online_config": online.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "baseline_seconds": base,
        "online_seconds": onl,
        "ratio_median": med_o / med_b,
        "steady_state_ratio": 1.0 + meas_s / (online.adapt_every * step_s) if n_meas else None,
        "ratio_min": min(onl) / min(base),
        "baseline_cpu_seconds": [x["cpu_seconds"] for x in runs["baseline"]],
        "online_cpu_seconds": [x["cpu_seconds"] for x in runs["online"]],
        "cpu_ratio_median": statistics.median(x["cpu_seconds"] for x in runs["online"])
        / statistics.median(x["cpu_seconds"] for x in runs["baseline"]),
        "cpu_ratio_min": min(x["cpu_seconds"] for x in runs["online"])
        / min(x["cpu_seconds"] for x in runs["baseline"]),
        "measured_fraction": fractions,
        "measured_fraction_local_iterations": in_iters,
        "measurement_in_iterations_median": statistics.median(per_meas) if per_meas else None,
        "measurement_in_iterations": per_meas,
        "n_matvec_per_measurement": [int(h) for h in runs["online"][0].get("n_matvec_each", [])],
        "accepted_per_measurement": runs["online"][0].get("accepted_each", []),
        "measurement_steps": runs["online"][0].get("measurement_steps", []),
        "measurement_seconds_total": [sum(x["measurement_seconds"]) for x in runs["online"]],
        "target": TARGET,
        "measurements": n_meas,
        "n_matvec_total": n_mv,
        "seconds_per_step": step_s,
        "seconds_per_measurement": meas_s,
        "seconds_per_hvp": hvp_s,
        "hvp_over_step": hvp_s / step_s if step_s else math.nan,
        "adapt_every_for_target": math.ceil(need) if math.isfinite(need) else None,
        "load_before": load_before,
        "load_after": load_after,
        "command": " ".join(
            [
                os.path.relpath(sys.argv[0]) if argv is None else "online_overhead.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "online_config"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
