"""Ladder results -> law (``OUT/law.json``) -> the target's prediction (``OUT/prediction.json``).

The law is fitted as ``lrscale fit`` fits one (optima per proxy, grouped CV, bootstrap over whole
proxies) with one difference: ``params`` is each proxy's non-embedding parameter count as
``ModelConfig.num_non_embedding_params`` counts it (biases and norms included), the same count
``lrscale compare`` and the DeepSpeed ``"model": "auto"`` block feed the law at prediction time, so
proxies and target are measured with one ruler. ``law.json`` is a regular law file: use it as
``"law": "OUT/law.json"`` in the LRScale scheduler params or a compare config's ``lrscale.law``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lrscale_megatron.law.data import RunTable, load_store
from lrscale_megatron.law.fit import FitConfig
from lrscale_megatron.law.pipeline import FittedLaw, fit_law
from lrscale_megatron.law.predict import Prediction, deepspeed_scheduler_block, predict
from lrscale_megatron.sweep.cli import load_sweep_config
from lrscale_megatron.tune.config import TuneConfig, TuneConfigError
from lrscale_megatron.tune.ladder import Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Costs:
    """Compute of the ladder next to one target run (FLOPs = 6 N D; wall in seconds)."""

    proxy_flops: float
    proxy_wall_s: float
    proxy_runs: int
    target_flops: float
    target_wall_s_est: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "proxy_runs": self.proxy_runs,
            "proxy_flops": self.proxy_flops,
            "proxy_wall_s": self.proxy_wall_s,
            "target_run_flops": self.target_flops,
            "target_run_wall_s_estimated": self.target_wall_s_est,
            "proxy_over_target_flops": self.proxy_flops / self.target_flops,
            "wall_estimate": "least-squares line wall = a + b * FLOPs through the proxy runs, at the target",
        }


def true_params(store: Path, ladder: Path) -> dict[tuple[int, int], int]:
    """(width, depth) -> non-embedding parameters of that proxy, from its real train config."""
    from lrscale_megatron.sweep.megatron import train_config_dict
    from lrscale_megatron.train.config import config_from_dict

    sc = load_sweep_config(ladder)
    out: dict[tuple[int, int], int] = {}
    for point in sc.grid.expand():
        key = (int(point["width"]), int(point["depth"]))
        if key not in out:
            raw, base = train_config_dict(point, sc.settings)
            out[key] = int(config_from_dict(raw, base_dir=base).model.num_non_embedding_params())
    return out


def ladder_table(out_dir: Path, loss: str) -> RunTable:
    """The ladder's finished and diverged runs with true non-embedding ``params``."""
    store = out_dir / "sweep.sqlite"
    table = load_store(store, loss)
    counts = true_params(store, out_dir / "ladder.json")
    params = np.array([counts[(int(w), int(d))] for w, d in zip(table.width, table.depth, strict=True)])
    return replace(table, params=params)


def default_predictors(table: RunTable) -> tuple[str, ...]:
    """``params``, plus ``batch`` when the ladder has several batch sizes."""
    preds: tuple[str, ...] = ("params",)
    if len(set(table.batch_tokens.tolist())) > 1:
        preds += ("batch",)
    return preds


def fit_ladder(cfg: TuneConfig, out_dir: Path, command: str) -> FittedLaw:
    """Fit the law to the ladder (grouped CV over proxies, bootstrap over whole proxies)."""
    table = ladder_table(out_dir, cfg.fit.loss)
    preds = cfg.fit.predictors or default_predictors(table)
    n_groups = len({(p, t) for p, t in zip(table.params, table.tokens, strict=True)})
    folds = min(5, n_groups) if n_groups >= 3 else 0
    config = FitConfig(
        tuple(preds), folds=folds, bootstrap=cfg.fit.bootstrap, seed=cfg.fit.seed, regressor=cfg.fit.regressor
    )
    prov = {
        "data": str(out_dir / "sweep.sqlite"),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "ladder": str(out_dir / "ladder.json"),
        "target": cfg.target,
        "params": "non-embedding parameters as ModelConfig.num_non_embedding_params counts them",
    }
    try:
        return fit_law(table, config, f"tune-{Path(cfg.target).stem}", prov, method=cfg.fit.method)
    except ValueError as e:
        raise TuneConfigError(
            "fit",
            list(preds),
            f"cannot fit the ladder ({e})",
            "widen the LR grid (ladder.lr_min / lr_max, ladder.extend) so every proxy's optimum is "
            "bracketed, add proxies, or use fewer predictors",
        ) from None


def estimate_costs(out_dir: Path, target: Target, counts: dict[tuple[int, int], int]) -> Costs:
    from lrscale_megatron.sweep.store import SweepStore

    store = SweepStore(out_dir / "sweep.sqlite")
    try:
        runs = [r for r in store.runs() if r.done and r.wall_clock_s is not None]
    finally:
        store.close()
    flops = np.array(
        [6.0 * counts[(int(r.config["width"]), int(r.config["depth"]))] * r.config["tokens"] for r in runs]
    )
    wall = np.array([float(r.wall_clock_s or 0.0) for r in runs])
    est = float("nan")
    if len(set(flops.tolist())) >= 2:
        b, a = np.polyfit(flops, wall, 1)
        est = float(max(a, 0.0) + max(b, 0.0) * target.flops)
    elif len(runs):
        est = float(wall.mean() * target.flops / flops.mean())
    return Costs(float(flops.sum()), float(wall.sum()), len(runs), target.flops, est)


def scheduler_params(target: Target, peak: float) -> dict[str, Any]:
    """The target's own schedule (warmup, total steps, decay style, min LR ratio) around the new peak."""
    from lrscale_megatron.scheduler import LRScaleConfig
    from lrscale_megatron.train.config import load_config

    ds = load_config(target.path).deepspeed
    sp = ((ds.get("scheduler") or {}).get("params")) or {}
    style = sp.get("decay_style", "cosine")
    min_lr = sp.get("min_lr", 0.1 * peak)
    min_lr = float(min_lr) if isinstance(min_lr, int | float) else 0.1 * peak
    if (
        isinstance(sp.get("min_lr"), int | float)
        and isinstance(sp.get("peak_lr"), int | float)
        and sp["peak_lr"]
    ):
        min_lr = peak * float(sp["min_lr"]) / float(sp["peak_lr"])  # keep the target's floor ratio
    params = {
        "min_lr": min_lr,
        "warmup_steps": target.warmup_steps,
        "total_steps": target.steps,
        "decay_style": style,
    }
    LRScaleConfig.from_dict({"peak_lr": peak, **params}, where="scheduler.params")
    return params


def megatron_flags(target: Target, peak: float, sched: dict[str, Any]) -> list[str]:
    """Megatron-LM arguments of the target at the predicted peak (iterations; cosine etc. as scheduled)."""
    style = (
        sched["decay_style"]
        if sched["decay_style"] in ("cosine", "linear", "inverse-square-root")
        else "cosine"
    )
    return [
        f"--lr {peak:.6g}",
        f"--min-lr {sched['min_lr']:.6g}",
        f"--lr-warmup-iters {target.warmup_steps}",
        f"--lr-decay-iters {target.steps}",
        f"--lr-decay-style {style}",
        f"--train-iters {target.steps}",
        f"--global-batch-size {target.batch_tokens // target.seq_len}",
        f"--seq-length {target.seq_len}",
    ]


def predict_target(law_fit: FittedLaw, target: Target) -> tuple[Prediction, float]:
    """The law's peak LR for the target and the extrapolation factor (target / largest proxy params)."""
    law = law_fit.law
    pred = predict(
        law,
        params=float(target.params),
        tokens=float(target.tokens),
        batch_tokens=float(target.batch_tokens),
        width=float(target.width),
        depth=float(target.depth),
    )
    hi = law.fitted_ranges["params"][1] if law.fitted_ranges and "params" in law.fitted_ranges else math.nan
    return pred, float(target.params / hi) if math.isfinite(hi) else math.nan


def write_outputs(
    out_dir: Path,
    fitted: FittedLaw,
    pred: Prediction,
    factor: float,
    target: Target,
    costs: Costs,
    notes: list[str],
) -> dict[str, Any]:
    """``law.json`` and ``prediction.json``; returns the prediction document."""
    fitted.law.save(out_dir / "law.json")
    sched = scheduler_params(target, pred.peak_lr)
    fit = fitted.fit
    doc = {
        "target": target.path,
        "peak_lr": pred.peak_lr,
        "interval": list(pred.interval),
        "interval_level": 0.90,
        "extrapolation_factor": factor,
        "extrapolation": "target non-embedding params / largest proxy's",
        "batch_tokens": target.batch_tokens,
        "suggested_batch_tokens": pred.batch_tokens if "batch" in fitted.law.predictors else None,
        "law": str(out_dir / "law.json"),
        "exponents": dict(fitted.law.exponents),
        "exponent_ci": {p: list(v) for p, v in fit.ci.items() if p != "log_c"},
        "cv": None if fit.cv is None else {"folds": fit.cv.folds, "r2": fit.cv.r2, "mae_log": fit.cv.mae_log},
        "optima": [
            {
                "params": o.key.params,
                "width": o.key.width,
                "depth": o.key.depth,
                "eta_star": o.eta_star,
                "loss_star": o.loss_star,
            }
            for o in fitted.optima
        ],
        "scheduler": deepspeed_scheduler_block(pred, **sched),
        "megatron_flags": megatron_flags(target, pred.peak_lr, sched),
        "target_sizes": {
            "params": target.params,
            "tokens": target.tokens,
            "width": target.width,
            "depth": target.depth,
            "steps": target.steps,
        },
        "costs": costs.to_dict(),
        "warnings": list(pred.warnings) + notes,
    }
    (out_dir / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc
