"""Runs -> ``report.json`` and ``report.md``: time to target, equal-compute loss, held-out perplexity,
ratios against every baseline, compute to a tuned LR, and the issue's done-when checks.

Per-run and per-arm figures: :mod:`.summary`; compute to a tuned LR: :mod:`.cost`; the markdown:
:mod:`.markdown`; the PNGs: :mod:`.plots`. ``cosine_grid_best`` is the grid LR with the lowest mean final
validation loss over seeds.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from lrscale_megatron.compare.cost import compute_to_tuned_lr
from lrscale_megatron.compare.metrics import ratio, spread
from lrscale_megatron.compare.runner import CompareRuns, _load_avg
from lrscale_megatron.compare.summary import (
    _cuda,
    arm_entry,
    online_overhead,
    schedule_name,
    seed_row,
    target_loss,
)

logger = logging.getLogger(__name__)

#: Baselines ``lrscale_offline`` is compared with on final validation loss at equal steps.
LOSS_RIVALS = ("cosine", "inverse_sqrt", "steplaw_formula", "schedulefree", "prodigy", "cosine_grid_best")
#: The issue's done-when thresholds (issue 10): steps-to-target vs cosine, final loss vs the grid's best.
MAX_STEPS_RATIO = 0.75
MAX_GRID_LOSS_RATIO = 1.02


def _grid(runs: CompareRuns, target: float, on_gpu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The grid's best entry and the ``grid`` section (every point)."""
    points = []
    for lr, seeds in runs.arms["cosine_grid_best"].items():
        rows = [seed_row(r, target, on_gpu) for r in seeds]
        points.append((lr, arm_entry("cosine_grid_best", schedule_name(runs, "cosine_grid_best"), rows)))
    best_lr, best = min(points, key=lambda p: p[1]["final_val_loss"])
    grid = {
        "lrs": [lr for lr, _ in points],
        "selection": "lowest mean final validation loss over seeds",
        "best_lr": best_lr,
        "best_at_edge": best_lr in (min(lr for lr, _ in points), max(lr for lr, _ in points)),
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
    return best, grid


def ratios_and_checks(
    by_name: dict[str, dict[str, Any]], steps_budget: int
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Ratios of ``lrscale_offline`` / ``lrscale_online`` to each baseline, and the done-when checks
    (``{"check", "value", "threshold", "met"}``; ``met`` is ``None`` when a figure is missing)."""

    def steps(a: str) -> float | None:
        return by_name[a]["steps_to_target"] if a in by_name else None

    def loss(a: str) -> float | None:
        return by_name[a]["final_val_loss"] if a in by_name else None

    r: dict[str, float | None] = {}
    for a in ("lrscale_offline", "lrscale_online"):
        for ref in ("cosine", "cosine_grid_best"):
            if ref not in by_name:
                continue
            name = "cosine" if ref == "cosine" else "grid_best"
            r[f"{a}_over_{name}_steps_to_target"] = ratio(steps(a), steps(ref))
            if steps(a) is None and steps(ref):
                # not reached within the budget: the ratio is at least steps / the reference's steps
                r[f"{a}_over_{name}_steps_to_target_lower_bound"] = steps_budget / steps(ref)  # type: ignore[operator]
    for ref in LOSS_RIVALS:
        if ref in by_name:
            name = "grid_best" if ref == "cosine_grid_best" else ref
            r[f"lrscale_offline_over_{name}_final_val_loss"] = ratio(loss("lrscale_offline"), loss(ref))
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, threshold: float, lower_bound: float | None = None) -> None:
        met = None if value is None else value <= threshold
        if value is None and lower_bound is not None and lower_bound > threshold:
            met = False  # not reached: the ratio is at least the lower bound, already above the threshold
        checks.append(
            {"check": name, "value": value, "lower_bound": lower_bound, "threshold": threshold, "met": met}
        )

    check(
        "steps-to-target lrscale_offline / cosine",
        r.get("lrscale_offline_over_cosine_steps_to_target"),
        MAX_STEPS_RATIO,
        r.get("lrscale_offline_over_cosine_steps_to_target_lower_bound"),
    )
    if "cosine_grid_best" in by_name:
        check(
            "final val loss lrscale_offline / grid best",
            r.get("lrscale_offline_over_grid_best_final_val_loss"),
            MAX_GRID_LOSS_RATIO,
        )
    for rival in ("steplaw_formula", "schedulefree", "prodigy"):
        if rival in by_name:
            # "better" = strictly lower mean final loss: the ratio must be below 1
            v = r.get(f"lrscale_offline_over_{rival}_final_val_loss")
            checks.append(
                {
                    "check": f"final val loss lrscale_offline / {rival} < 1",
                    "value": v,
                    "lower_bound": None,
                    "threshold": 1.0,
                    "met": None if v is None else v < 1.0,
                }
            )
    return r, checks


def held_out_corpus(data: dict[str, Any]) -> str | None:
    """The held-out (distribution-shift) corpus of a run's ``data`` section (``"auto"`` resolved)."""
    from lrscale_megatron.data.corpora import SHIFT_CORPUS

    shift, corpus = data.get("shift"), data.get("corpus")
    if shift == "auto":
        return SHIFT_CORPUS.get(str(corpus))
    return None if shift in (None, "none") else str(shift)


def _lambada_setup(all_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Passage count and source of the last-word metric (``None`` when no run scored it)."""
    scored = [r["lambada"] for r in all_runs if r.get("lambada")]
    if not scored:
        return None
    return {
        "n": scored[0]["n"],
        "source": scored[0]["source"],
        "runs_scored": len(scored),
        "runs": len(all_runs),
    }


def build_report(runs: CompareRuns) -> dict[str, Any]:
    """The whole ``report.json`` content."""
    cfg = runs.config
    on_gpu = _cuda()
    target = target_loss(runs)
    arms: list[dict[str, Any]] = []
    grid: dict[str, Any] | None = None
    by_name: dict[str, dict[str, Any]] = {}
    for arm in cfg.ordered_arms:
        if arm == "cosine_grid_best":
            entry, grid = _grid(runs, target, on_gpu)
        else:
            (seeds,) = runs.arms[arm].values()
            entry = arm_entry(arm, schedule_name(runs, arm), [seed_row(r, target, on_gpu) for r in seeds])
        arms.append(entry)
        by_name[arm] = entry
    all_runs = [r for by_lr in runs.arms.values() for seeds in by_lr.values() for r in seeds]
    steps = cfg.steps if cfg.steps is not None else int(all_runs[0]["steps"])
    ratios, checks = ratios_and_checks(by_name, steps)
    if grid is not None:
        ratios["grid_training_runs_per_lrscale_run"] = len(grid["lrs"])
    compute = None
    if grid is not None and "lrscale_offline" in runs.arms:
        (offline,) = runs.arms["lrscale_offline"].values()
        from lrscale_megatron.compare.arms import non_embedding_params

        n = float(non_embedding_params(cfg))
        compute = compute_to_tuned_lr(offline, runs.arms["cosine_grid_best"], cfg.tune, n)
    data = (all_runs[0].get("config") or {}).get("data", {}) if all_runs else {}
    return {
        "date": _dt.date.today().isoformat(),
        "config": cfg.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "device": "cuda" if on_gpu else "cpu",
            "load_avg_start": runs.load_start,
            "load_avg_end": _load_avg(),
            "load_avg_1min_over_runs": spread(
                [r["load_avg_end"][0] for r in all_runs if r.get("load_avg_end")]
            ),
        },
        "baseline": {"lr": cfg.baseline.lr, "justification": cfg.baseline.justification},
        "offline_peak": runs.peak.to_dict(),
        "steplaw_peak": runs.peaks["steplaw"].to_dict() if "steplaw" in runs.peaks else None,
        "corpora": {"train": data.get("corpus"), "held_out": held_out_corpus(data)},
        "lambada": _lambada_setup(all_runs),
        "target_loss": target,
        "target_rule": cfg.target.describe(),
        "steps": steps,
        "seeds": list(cfg.seeds),
        "arms": arms,
        "grid": grid,
        "ratios": ratios,
        "done_when": checks,
        "compute_to_tuned_lr": compute,
        "online_overhead": online_overhead(runs),
        "runs": {"trained": runs.trained, "reused": runs.reused},
        "runs_elapsed_s": sum(float(r.get("elapsed_s", 0.0)) for r in all_runs),
        "units": {
            "steps": "optimizer iterations",
            "wall_s": "training seconds (evaluation excluded)",
            "gpu_hours": "n/a on CPU (null)" if not on_gpu else "wall x processes / 3600",
            "energy_j": "joules from NVML; null when unavailable (CPU), never 0",
            "loss": "nats/token",
            "shift_ppl": "exp(validation loss) on the held-out corpus (data.shift)",
            "lambada_acc": "share of held-out passages whose last word the greedy model reproduces",
            "lambada_word_nll": "nats per last word",
        },
    }


def write_report(runs: CompareRuns, output_dir: str | Path) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the PNGs into ``output_dir``; returns the report."""
    from lrscale_megatron.compare.markdown import render_markdown
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
