"""Runs -> ``report.json`` and ``report.md``: time to target, equal-compute loss, shift perplexity, ratios.

What is measured (also written into the report's notes):

* target: :class:`~lrscale_megatron.compare.config.TargetConfig` (fixed, or derived from the cosine arm);
* steps / wall-clock / tokens to target: :mod:`.metrics` (interpolated between validation evaluations);
  an arm's figure is the mean over seeds, ``null`` unless every seed reached the target;
* GPU-hours: ``wall_to_target_s x processes / 3600`` on CUDA; ``null`` ("n/a") on CPU;
* energy: NVML energy of the run (``TrainResult.energy_j``) scaled by ``wall_to_target / wall``
  (constant power assumed); ``null`` when NVML is unavailable (CPU), never 0;
* equal compute: every arm trains the same ``steps`` on the same batches; ``final_val_loss`` is the
  validation loss after the last step;
* held-out corpus: ``shift_ppl = exp(shift_loss)`` on the other shipped corpus (``data.shift``);
* ``cosine_grid_best``: the grid LR with the lowest mean final validation loss over seeds.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
from pathlib import Path
from typing import Any

from lrscale_megatron.compare.metrics import mean_if_all, measurement_overhead, ratio, spread, to_target
from lrscale_megatron.compare.runner import CompareRuns, _load_avg

logger = logging.getLogger(__name__)

PER_SEED_STATS = (
    "steps_to_target",
    "wall_to_target_s",
    "tokens_to_target",
    "final_val_loss",
    "shift_loss",
    "shift_ppl",
    "wall_s",
)


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def target_loss(runs: CompareRuns) -> float:
    """The target validation loss under ``config.target`` (needs the cosine arm for ``cosine_final``)."""
    t = runs.config.target
    if t.rule == "fixed":
        assert t.loss is not None  # TargetConfig guarantees it
        return float(t.loss)
    finals = [r["final_val_loss"] for seeds in runs.arms["cosine"].values() for r in seeds]
    if t.reduce == "min":
        base = min(finals)
    elif t.reduce == "max":
        base = max(finals)
    else:
        base = sum(finals) / len(finals)
    return float(base) * (1.0 + t.margin)


def seed_row(res: dict[str, Any], target: float, on_gpu: bool) -> dict[str, Any]:
    """One run's figures."""
    hist = res["history"]
    tokens_per_step = res["tokens"] / res["steps"]
    tt = to_target(hist, target, tokens_per_step)
    procs = int(res.get("layout", {}).get("world_size", 1))
    energy = res.get("energy_j")
    shift = res.get("shift_loss")
    adapt = [a for a in res.get("adaptations", []) if a.get("accepted")]
    return {
        "seed": res["spec"]["seed"],
        "run_id": res["run_id"],
        "peak_lr": res["spec"]["peak_lr"],
        "steps_to_target": tt.steps,
        "first_eval_step_at_target": tt.first_eval_step,
        "wall_to_target_s": tt.wall_s,
        "tokens_to_target": tt.tokens,
        "gpu_hours_to_target": (tt.wall_s * procs / 3600.0) if (on_gpu and tt.wall_s is not None) else None,
        "energy_to_target_j": (
            energy * tt.wall_s / res["wall_s"]
            if energy is not None and tt.wall_s is not None and res["wall_s"] > 0
            else None
        ),
        "final_val_loss": res["final_val_loss"],
        "shift_loss": shift,
        "shift_ppl": math.exp(shift) if shift is not None else None,
        "steps": res["steps"],
        "tokens": res["tokens"],
        "wall_s": res["wall_s"],
        "energy_j": energy,
        "n_measurements": sum(1 for r in hist if r.get("lambda_max") is not None),
        "final_adapted_peak": adapt[-1]["peak_after"] if adapt else None,
    }


def arm_entry(name: str, schedule: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's summary: headline figures (means; time-to-target ``null`` unless every seed reached it),
    the spread of each figure over seeds, and the per-seed rows."""
    return {
        "name": name,
        "schedule": schedule,
        "peak_lr": rows[0]["peak_lr"],
        "seeds": [r["seed"] for r in rows],
        "reached": f"{sum(r['steps_to_target'] is not None for r in rows)}/{len(rows)}",
        "steps_to_target": mean_if_all([r["steps_to_target"] for r in rows]),
        "wall_to_target_s": mean_if_all([r["wall_to_target_s"] for r in rows]),
        "tokens_to_target": mean_if_all([r["tokens_to_target"] for r in rows]),
        "gpu_hours_to_target": mean_if_all([r["gpu_hours_to_target"] for r in rows]),
        "energy_to_target_j": mean_if_all([r["energy_to_target_j"] for r in rows]),
        "final_val_loss": spread([r["final_val_loss"] for r in rows])["mean"],
        "shift_ppl": spread([r["shift_ppl"] for r in rows])["mean"],
        "stats": {k: spread([r[k] for r in rows]) for k in PER_SEED_STATS},
        "per_seed": rows,
    }


def _schedule_name(runs: CompareRuns, arm: str) -> str:
    c = runs.config
    return {
        "cosine": f"DeepSpeed WarmupCosineLR ({c.baseline.warmup_type} warmup, floor {c.min_lr_ratio} x peak)",
        "inverse_sqrt": "LRScale inverse_sqrt",
        "lrscale_offline": f"LRScale {c.lrscale.decay_style} (offline peak)",
        "lrscale_online": f"LRScale {c.lrscale.decay_style} + online adaptation",
        "cosine_grid_best": "DeepSpeed WarmupCosineLR, best grid LR",
    }[arm]


def build_report(runs: CompareRuns) -> dict[str, Any]:
    """The whole ``report.json`` content."""
    cfg = runs.config
    on_gpu = _cuda()
    target = target_loss(runs)
    arms: list[dict[str, Any]] = []
    grid: dict[str, Any] | None = None
    by_name: dict[str, dict[str, Any]] = {}
    for arm in cfg.ordered_arms:
        by_lr = runs.arms[arm]
        if arm == "cosine_grid_best":
            points = []
            for lr, seeds in by_lr.items():
                rows = [seed_row(r, target, on_gpu) for r in seeds]
                points.append((lr, arm_entry(arm, _schedule_name(runs, arm), rows)))
            best_lr, best = min(points, key=lambda p: p[1]["final_val_loss"])
            grid = {
                "lrs": [lr for lr, _ in points],
                "selection": "lowest mean final validation loss over seeds",
                "best_lr": best_lr,
                "points": [
                    {
                        "lr": lr,
                        "final_val_loss": e["stats"]["final_val_loss"],
                        "steps_to_target": e["steps_to_target"],
                        "reached": e["reached"],
                    }
                    for lr, e in points
                ],
            }
            entry = best
        else:
            (seeds,) = by_lr.values()
            entry = arm_entry(arm, _schedule_name(runs, arm), [seed_row(r, target, on_gpu) for r in seeds])
        arms.append(entry)
        by_name[arm] = entry

    def steps(a: str) -> float | None:
        return by_name[a]["steps_to_target"] if a in by_name else None

    def loss(a: str) -> float | None:
        return by_name[a]["final_val_loss"] if a in by_name else None

    ratios: dict[str, Any] = {
        "lrscale_offline_over_cosine_steps_to_target": ratio(steps("lrscale_offline"), steps("cosine")),
        "lrscale_online_over_cosine_steps_to_target": ratio(steps("lrscale_online"), steps("cosine")),
        "lrscale_offline_over_cosine_final_val_loss": ratio(loss("lrscale_offline"), loss("cosine")),
    }
    refs = ("cosine", "cosine_grid_best") if grid is not None else ("cosine",)
    for ref in refs:
        ref_steps = steps(ref)
        ref_name = "cosine" if ref == "cosine" else "grid_best"
        for a in ("lrscale_offline", "lrscale_online"):
            if ref != "cosine":
                ratios[f"{a}_over_grid_best_steps_to_target"] = ratio(steps(a), ref_steps)
                ratios[f"{a}_over_grid_best_final_val_loss"] = ratio(loss(a), loss(ref))
            if steps(a) is None and ref_steps:
                # not reached within the budget: the ratio is at least steps / the reference's steps
                ratios[f"{a}_over_{ref_name}_steps_to_target_lower_bound"] = cfg.steps / ref_steps
    if grid is not None:
        ratios["grid_training_runs_per_lrscale_run"] = len(grid["lrs"])
    return {
        "date": _dt.date.today().isoformat(),
        "config": cfg.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": _cpu_count(),
            "device": "cuda" if on_gpu else "cpu",
            "load_avg_start": runs.load_start,
            "load_avg_end": _load_avg(),
            "load_avg_1min_over_runs": spread(
                [r["load_avg_end"][0] for seeds in _all_runs(runs) for r in seeds if r.get("load_avg_end")]
            ),
        },
        "baseline": {"lr": cfg.baseline.lr, "justification": cfg.baseline.justification},
        "offline_peak": runs.peak.to_dict(),
        "target_loss": target,
        "target_rule": cfg.target.describe(),
        "steps": cfg.steps,
        "seeds": list(cfg.seeds),
        "arms": arms,
        "grid": grid,
        "ratios": ratios,
        "online_overhead": online_overhead(runs),
        "runs": {"trained": runs.trained, "reused": runs.reused},
        "units": {
            "steps": "optimizer iterations",
            "wall_s": "training seconds (evaluation excluded)",
            "gpu_hours": "n/a on CPU (null)" if not on_gpu else "wall x processes / 3600",
            "energy_j": "joules from NVML; null when unavailable (CPU), never 0",
            "loss": "nats/token",
        },
    }


def _all_runs(runs: CompareRuns) -> list[list[dict[str, Any]]]:
    return [seeds for by_lr in runs.arms.values() for seeds in by_lr.values()]


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def online_overhead(runs: CompareRuns) -> dict[str, Any] | None:
    """Online adaptation's wall-clock cost, two ways, per seed and spread.

    ``paired_total``: ``wall(lrscale_online) / wall(lrscale_offline) - 1`` for the same seed (same steps;
    the LR does not change a step's cost) - exposed to machine-load noise between the two runs.
    ``measured_steps``: :func:`~.metrics.measurement_overhead` within the online run itself.
    """
    if "lrscale_online" not in runs.arms or "lrscale_offline" not in runs.arms:
        return None
    (on,) = runs.arms["lrscale_online"].values()
    (off,) = runs.arms["lrscale_offline"].values()
    off_by_seed = {r["spec"]["seed"]: r for r in off}
    paired, within, per_seed = [], [], []
    for r in on:
        s = r["spec"]["seed"]
        m = measurement_overhead(r["history"])
        p = r["wall_s"] / off_by_seed[s]["wall_s"] - 1.0 if s in off_by_seed else None
        paired.append(p)
        within.append(m["fraction"])
        acc = [a for a in r.get("adaptations", []) if a.get("accepted")]
        changed = sum(1 for a in acc if a["peak_after"] != a["peak_before"])
        per_seed.append(
            {"seed": s, "paired_total": p, "n_accepted": len(acc), "n_peak_changed": changed, **m}
        )
    return {"paired_total": spread(paired), "measured_steps": spread(within), "per_seed": per_seed}


# ------------------------------------------------------------------------------------------ markdown
def _f(x: float | None, fmt: str = "{:.4g}") -> str:
    return "—" if x is None else fmt.format(x)


def _pm(st: dict[str, Any], fmt: str = "{:.4g}") -> str:
    if st["mean"] is None:
        return "not reached"
    s = f"{fmt.format(st['mean'])} ± {fmt.format(st['std'])} [{fmt.format(st['min'])}, {fmt.format(st['max'])}]"
    return s + (f" ({st['n_missing']} seed(s) not reached)" if st["n_missing"] else "")


def time_to_target_table(rep: dict[str, Any]) -> str:
    """The headline table (also printed by the CLI)."""
    on_gpu = rep["machine"]["device"] == "cuda"
    lines = [
        "| arm | peak LR | reached | steps to target | wall to target (s) | tokens to target | GPU-h | energy (J) "
        "| final val loss (equal steps) | shift ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in rep["arms"]:
        st = a["stats"]
        lines.append(
            f"| {a['name']} | {a['peak_lr']:.4g} | {a['reached']} | {_pm(st['steps_to_target'], '{:.1f}')} "
            f"| {_pm(st['wall_to_target_s'], '{:.1f}')} | {_f(a['tokens_to_target'], '{:.3g}')} "
            f"| {_f(a['gpu_hours_to_target'], '{:.3g}') if on_gpu else 'n/a (CPU)'} "
            f"| {_f(a['energy_to_target_j'], '{:.3g}') if a['energy_to_target_j'] is not None else 'unavailable'} "
            f"| {_pm(st['final_val_loss'], '{:.4f}')} | {_pm(st['shift_ppl'], '{:.2f}')} |"
        )
    return "\n".join(lines)


def render_markdown(rep: dict[str, Any], plots: list[str]) -> str:
    cfg = rep["config"]
    peak = rep["offline_peak"]
    r = rep["ratios"]
    m = rep["machine"]
    out = [
        f"# Baseline comparison: {Path(cfg['source']).name}",
        "",
        f"Date {rep['date']}; {m['platform']}, {m['cpus']} CPUs, device {m['device']}; load average "
        f"(1/5/15 min) when this report started {_load(m['load_avg_start'])}, at its end "
        f"{_load(m['load_avg_end'])}; 1-min load as each run finished: "
        f"{_pm(m['load_avg_1min_over_runs'], '{:.2f}') if m['load_avg_1min_over_runs']['n'] else 'not recorded'}.",
        f"Train config `{cfg['train_config']}` (overrides {cfg['overrides'] or 'none'}), {rep['steps']} "
        f"iterations per run, seeds {rep['seeds']}, validation every {cfg['eval_every']} iterations.",
        "",
        f"**Target validation loss: {rep['target_loss']:.4f}** ({rep['target_rule']}).",
        "",
        f"**Baseline LR {rep['baseline']['lr']:.4g}**: {rep['baseline']['justification']}",
        "",
        f"**LRScale offline peak {peak['peak_lr']:.4g}** from {peak['source']}"
        + (
            f" (fit interval {peak['interval'][0]:.3g}–{peak['interval'][1]:.3g})."
            if peak["interval"]
            else "."
        ),
    ]
    if peak["warnings"]:
        out += ["", "The law extrapolates here — its prediction is outside what it was fitted on:"]
        out += [f"- {w}" for w in peak["warnings"]]
    out += ["", "## Time to target", "", time_to_target_table(rep), ""]
    out += [
        "Mean ± sample std [min, max] over seeds. Steps to target: the validation loss interpolated linearly "
        "between the last evaluation above the target and the first at or below it; an arm's headline "
        "figure needs every seed to reach the target. Wall-clock is training time only (evaluation "
        "excluded), on a machine shared with other jobs: compare it within this report only.",
        "",
        "## Ratios",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    out += [f"| {k} | {_f(v, '{:.3f}')} |" for k, v in r.items()]
    if rep["grid"] is not None:
        g = rep["grid"]
        out += [
            "",
            f"## Tuned baseline: cosine LR grid ({len(g['lrs'])} points, {g['selection']})",
            "",
            "| LR | final val loss | steps to target | reached |",
            "|---|---|---|---|",
        ]
        for p in g["points"]:
            best = " **(best)**" if p["lr"] == g["best_lr"] else ""
            out.append(
                f"| {p['lr']:.4g}{best} | {_pm(p['final_val_loss'], '{:.4f}')} "
                f"| {_f(p['steps_to_target'], '{:.1f}')} | {p['reached']} |"
            )
        out += [
            "",
            f"The grid costs {len(g['lrs'])} training runs per seed; each LRScale arm costs one.",
        ]
    ov = rep["online_overhead"]
    if ov is not None:
        out += [
            "",
            "## Online adaptation overhead",
            "",
            f"- within the online run (measurement steps' excess over the median step): "
            f"{_pm(ov['measured_steps'], '{:.2%}')}",
            f"- paired total wall-clock, online / offline − 1 (same seed; load noise included): "
            f"{_pm(ov['paired_total'], '{:.2%}')}",
        ]
        for s in ov["per_seed"]:
            out.append(
                f"- seed {s['seed']}: {s['n_measurements']} measurements ({s['n_accepted']} accepted, "
                f"{s['n_peak_changed']} changed the peak), {s['measure_s']:.2f} s of {s['train_s']:.1f} s"
            )
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += [
        "",
        "## Notes",
        "",
        "- Same model, data order, batch, optimizer (from the train config's DeepSpeed JSON) and seeds in "
        "every arm; only the scheduler block and the peak LR differ.",
        "- GPU-hours are n/a on CPU; energy is `null` (unavailable) without NVML, never 0.",
        "- The shift perplexity is exp(validation loss) on the held-out corpus (`data.shift`).",
        "- lambda_max is measured only by the `lrscale_online` arm (a measurement costs training time, so "
        "the other arms do not pay for one).",
        f"- Runs: {rep['runs']['trained']} trained now, {rep['runs']['reused']} reused from `runs/`.",
        "",
    ]
    return "\n".join(out)


def _load(x: Any) -> str:
    return "n/a" if not x else "/".join(f"{v:.2f}" for v in x)


def write_report(runs: CompareRuns, output_dir: str | Path) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the PNGs into ``output_dir``; returns the report."""
    from lrscale_megatron.compare.plots import write_plots

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(runs)
    plots = write_plots(runs, rep, out)
    rep["plots"] = plots
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / "report.md").write_text(render_markdown(rep, plots))
    logger.info("compare: wrote %s", out / "report.md")
    return rep
