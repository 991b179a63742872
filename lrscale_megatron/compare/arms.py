"""Arms -> runs: one :class:`RunSpec` (schedule, peak LR, seed) per training run, and its train config.

Every run shares the train config's model, data, batch, optimizer, clipping and ZeRO stage (taken from the
train config's DeepSpeed JSON); only the ``scheduler`` block, the peak LR and the seed differ:

=================  ==========================================================================
``cosine``         DeepSpeed ``WarmupCosineLR`` at ``baseline.lr``, decaying to ``min_lr_ratio``
``inverse_sqrt``   LRScale ``decay_style=inverse_sqrt`` at ``baseline.lr`` (DeepSpeed has none)
``lrscale_offline``  LRScale ``lrscale.decay_style`` at the law's peak (or ``lrscale.peak_lr``)
``lrscale_online``   the same plus ``online`` spectral adaptation (offline peak as reference)
``cosine_grid_best`` ``cosine`` at each ``grid.lrs`` value; the best mean final loss is reported
=================  ==========================================================================

A run's identity is the hash of its full, validated train config, so a grid point equal to the
baseline LR reuses the ``cosine`` runs and a rerun of the job finds finished runs on disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrscale_megatron.compare.config import CompareConfig
from lrscale_megatron.train.config import TrainConfig, apply_overrides, config_from_dict, load_deepspeed_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        schedule: ``cosine`` (DeepSpeed WarmupCosineLR), ``inverse_sqrt``, ``lrscale`` or ``lrscale_online``.
        peak_lr: the schedule's peak (for ``lrscale_online``: the offline reference the adaptation starts from).
        seed: ``training.seed``.
    """

    schedule: str
    peak_lr: float
    seed: int


@dataclass(frozen=True)
class OfflinePeak:
    """The LRScale arms' offline peak and where it came from (law inputs, interval, extrapolation warnings)."""

    peak_lr: float
    source: str
    interval: tuple[float, float] | None = None
    inputs: dict[str, float] | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_lr": self.peak_lr,
            "source": self.source,
            "interval": None if self.interval is None else list(self.interval),
            "inputs": self.inputs,
            "warnings": list(self.warnings),
        }


def base_train_raw(cfg: CompareConfig) -> tuple[dict[str, Any], Path]:
    """The train config JSON with ``cfg.overrides`` and ``training.steps/eval_every`` applied, the
    DeepSpeed JSON loaded inline; plus the folder relative paths resolve against."""
    path = cfg.train_config_path()
    if not path.is_file():
        from lrscale_megatron.compare.config import CompareConfigError

        raise CompareConfigError(
            "train_config",
            cfg.train_config,
            f"file not found ({path})",
            "give a path relative to the compare config",
        )
    raw = json.loads(path.read_text())
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = load_deepspeed_json(raw["deepspeed"], path.parent)
    raw = apply_overrides(
        raw,
        [
            *cfg.overrides,
            f"training.steps={cfg.steps}",
            f"training.eval_every={cfg.eval_every}",
            "training.output_dir=null",
            "checkpoint.dir=null",
            "checkpoint.load=null",
        ],
    )
    return raw, path.parent


def offline_peak(cfg: CompareConfig) -> OfflinePeak:
    """``lrscale.peak_lr``, or the law's prediction for the train config's sizes (the same inputs the
    DeepSpeed integration fills for ``"model": "auto"``: non-embedding params, run tokens, batch tokens)."""
    if cfg.lrscale.peak_lr is not None:
        return OfflinePeak(peak_lr=cfg.lrscale.peak_lr, source="lrscale.peak_lr (given)")
    from lrscale_megatron.law.lawfile import load_law
    from lrscale_megatron.law.predict import predict

    raw, base = base_train_raw(cfg)
    raw["training"]["lr"] = cfg.baseline.lr
    tc = config_from_dict(raw, base_dir=base)
    m, t = tc.model, tc.training
    batch_tokens = t.global_batch_size * m.seq_length
    assert cfg.lrscale.law is not None  # CompareConfig guarantees exactly one of law / peak_lr
    pred = predict(
        load_law(cfg.lrscale.law),
        params=float(m.num_non_embedding_params()),
        tokens=float(t.steps * batch_tokens),
        batch_tokens=float(batch_tokens),
        width=m.hidden_size,
        depth=m.num_layers,
    )
    for w in pred.warnings:
        logger.warning("compare: law %s: %s", cfg.lrscale.law, w)
    return OfflinePeak(
        peak_lr=float(pred.peak_lr),
        source=f"law {cfg.lrscale.law}",
        interval=(float(pred.interval[0]), float(pred.interval[1])),
        inputs={k: float(v) for k, v in pred.inputs.items()},
        warnings=tuple(pred.warnings),
    )


def arm_runs(cfg: CompareConfig, arm: str, peak: OfflinePeak) -> dict[float, list[RunSpec]]:
    """The runs of one arm, by peak LR (one LR except for the grid)."""
    b = cfg.baseline.lr
    if arm == "cosine":
        lrs, sched = [b], "cosine"
    elif arm == "inverse_sqrt":
        lrs, sched = [b], "inverse_sqrt"
    elif arm == "lrscale_offline":
        lrs, sched = [peak.peak_lr], "lrscale"
    elif arm == "lrscale_online":
        lrs, sched = [peak.peak_lr], "lrscale_online"
    elif arm == "cosine_grid_best":
        assert cfg.grid is not None  # CompareConfig guarantees it
        lrs, sched = list(cfg.grid.lrs), "cosine"
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return {lr: [RunSpec(sched, float(lr), s) for s in cfg.seeds] for lr in lrs}


def scheduler_block(cfg: CompareConfig, spec: RunSpec) -> dict[str, Any]:
    """The DeepSpeed ``scheduler`` block of one run (``"auto"`` = filled from the training section)."""
    floor = cfg.min_lr_ratio
    if spec.schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": "auto",
                "warmup_num_steps": "auto",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": floor,
                "warmup_type": cfg.baseline.warmup_type,
            },
        }
    params: dict[str, Any] = {"peak_lr": "auto", "warmup_steps": "auto", "total_steps": "auto"}
    if spec.schedule == "inverse_sqrt":
        params.update(decay_style="inverse_sqrt", min_lr=0.0)
    elif spec.schedule in ("lrscale", "lrscale_online"):
        style = cfg.lrscale.decay_style
        params.update(decay_style=style, min_lr=floor * spec.peak_lr if style != "inverse_sqrt" else 0.0)
        if spec.schedule == "lrscale_online":
            params["online"] = {**copy.deepcopy(dict(cfg.lrscale.online)), "enabled": True}
    else:
        raise ValueError(f"unknown schedule {spec.schedule!r}")
    return {"type": "LRScale", "params": params}


def train_config_for(cfg: CompareConfig, spec: RunSpec) -> TrainConfig:
    """The validated train config of one run."""
    raw, base = base_train_raw(cfg)
    raw = apply_overrides(raw, [f"training.lr={spec.peak_lr!r}", f"training.seed={spec.seed}"])
    raw["deepspeed"] = {**raw["deepspeed"], "scheduler": scheduler_block(cfg, spec)}
    return config_from_dict(raw, base_dir=base, source=f"{cfg.source}:{spec.schedule}")


def run_id(spec: RunSpec, tc: TrainConfig) -> str:
    """``<schedule>-lr<peak>-s<seed>-<hash of the full train config>``: a file name and a cache key."""
    digest = hashlib.sha256(json.dumps(tc.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{spec.schedule}-lr{spec.peak_lr:.4g}-s{spec.seed}-{digest}"
