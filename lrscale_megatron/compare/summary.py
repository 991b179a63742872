"""Per-run and per-arm figures of a comparison: the target, one row per seed, an arm's means and spread,
and the online arm's measurement overhead. Pure functions of the saved run results (no torch).

* target: :class:`~lrscale_megatron.compare.config.TargetConfig` (fixed, or derived from the cosine arm);
* steps / wall-clock / tokens to target: :mod:`.metrics` (interpolated between validation evaluations);
  an arm's figure is the mean over seeds, ``null`` unless every seed reached the target;
* GPU-hours: ``wall_to_target_s x processes / 3600`` on CUDA; ``null`` ("n/a") on CPU;
* energy: NVML energy of the run (``TrainResult.energy_j``) scaled by ``wall_to_target / wall``
  (constant power assumed); ``null`` when NVML is unavailable (CPU), never 0;
* equal compute: every arm trains the same ``steps`` on the same batches; ``final_val_loss`` is the
  validation loss after the last step;
* held-out corpus: ``shift_ppl = exp(shift_loss)`` on the other shipped corpus (``data.shift``: KJV when
  training on Shakespeare);
* downstream: ``lambada_acc``, LAMBADA-style greedy last-word accuracy on held-out passages
  (:mod:`lrscale_megatron.train.downstream`), and ``lambada_word_nll`` (nats per word); ``null`` for a
  run trained without it (``data.lambada_passages = 0``, or a result saved before it existed).
"""

from __future__ import annotations

import math
from typing import Any

from lrscale_megatron.compare.metrics import mean_if_all, measurement_overhead, spread, to_target
from lrscale_megatron.compare.runner import CompareRuns

PER_SEED_STATS = (
    "steps_to_target",
    "wall_to_target_s",
    "tokens_to_target",
    "final_val_loss",
    "shift_loss",
    "shift_ppl",
    "lambada_acc",
    "lambada_word_nll",
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
        if t.loss is None:
            raise ValueError("target.loss is required with rule='fixed'")
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
    lam = res.get("lambada")
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
        "lambada_acc": lam["accuracy"] if lam else None,
        "lambada_word_nll": lam["word_nll"] if lam else None,
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
        "lambada_acc": spread([r["lambada_acc"] for r in rows])["mean"],
        "stats": {k: spread([r[k] for r in rows]) for k in PER_SEED_STATS},
        "per_seed": rows,
    }


def schedule_name(runs: CompareRuns, arm: str) -> str:
    """What an arm trains with, in words (for the report)."""
    c = runs.config
    return {
        "cosine": f"DeepSpeed WarmupCosineLR ({c.baseline.warmup_type} warmup, floor {c.min_lr_ratio} x peak)",
        "inverse_sqrt": "LRScale inverse_sqrt",
        "lrscale_offline": f"LRScale {c.lrscale.decay_style} (offline peak)",
        "lrscale_online": f"LRScale {c.lrscale.decay_style} + online adaptation",
        "steplaw_formula": f"LRScale {c.lrscale.decay_style} at the {c.steplaw.law} peak",
        "schedulefree": "Schedule-Free AdamW (no schedule; optimizer warmup)",
        "prodigy": "Prodigy (lr multiplier, warmup + cosine to 0)",
        "cosine_grid_best": "DeepSpeed WarmupCosineLR, best grid LR",
    }[arm]


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
