"""Arms -> runs: one :class:`RunSpec` (schedule, peak LR, seed) per training run, and its train config.

Every run shares the train config's model, data, batch, clipping and ZeRO stage, and the AdamW betas, eps
and weight decay of its DeepSpeed JSON; only the ``scheduler`` block, the peak LR, the seed and (for the
LR-free arms) the optimizer differ:

===================  ==========================================================================
``cosine``           DeepSpeed ``WarmupCosineLR`` at ``baseline.lr``, decaying to ``min_lr_ratio``
``inverse_sqrt``     LRScale ``decay_style=inverse_sqrt`` at ``baseline.lr`` (DeepSpeed has none)
``lrscale_offline``  LRScale ``lrscale.decay_style`` at the law's peak (or ``lrscale.peak_lr``)
``lrscale_online``   the same plus ``online`` spectral adaptation (offline peak as reference)
``steplaw_formula``  the same schedule as ``lrscale_offline`` at the published Step Law peak
``schedulefree``     Schedule-Free AdamW, no schedule, its own warmup (:mod:`.optimizers`)
``prodigy``          Prodigy, lr 1.0 under warmup + cosine to 0 (:mod:`.optimizers`)
``cosine_grid_best`` ``cosine`` at each ``grid.lrs`` value; the best mean final loss is reported
===================  ==========================================================================

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

from lrscale_megatron.compare.config import CompareConfig, CompareConfigError
from lrscale_megatron.train.config import TrainConfig, apply_overrides, config_from_dict, load_deepspeed_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        schedule: ``cosine`` (DeepSpeed WarmupCosineLR), ``inverse_sqrt``, ``lrscale``, ``lrscale_online``,
            ``schedulefree`` (Schedule-Free AdamW) or ``prodigy``.
        peak_lr: the schedule's peak (for ``lrscale_online``: the offline reference the adaptation starts
            from; for ``prodigy``: its LR multiplier, 1.0).
        seed: ``training.seed``.
    """

    schedule: str
    peak_lr: float
    seed: int


@dataclass(frozen=True)
class OfflinePeak:
    """A law's peak for the target and where it came from (law inputs, interval, extrapolation warnings)."""

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
            *([f"training.steps={cfg.steps}"] if cfg.steps is not None else []),
            f"training.eval_every={cfg.eval_every}",
            "training.output_dir=null",
            "checkpoint.dir=null",
            "checkpoint.load=null",
        ],
    )
    return raw, path.parent


def non_embedding_params(cfg: CompareConfig) -> int:
    """The target model's non-embedding parameters (the law's ``params``; ``N`` of ``6 N D``)."""
    raw, base = base_train_raw(cfg)
    raw["training"]["lr"] = cfg.baseline.lr
    return int(config_from_dict(raw, base_dir=base).model.num_non_embedding_params())


def law_peak(cfg: CompareConfig, law: str) -> OfflinePeak:
    """``law``'s prediction for the train config's sizes (the same inputs the DeepSpeed integration fills
    for ``"model": "auto"``: non-embedding params, run tokens, batch tokens, width, depth)."""
    from lrscale_megatron.law.lawfile import LawFileError, load_law
    from lrscale_megatron.law.predict import predict

    raw, base = base_train_raw(cfg)
    raw["training"]["lr"] = cfg.baseline.lr
    tc = config_from_dict(raw, base_dir=base)
    m, t = tc.model, tc.training
    batch_tokens = t.global_batch_size * m.seq_length
    try:
        loaded = load_law(law)
    except LawFileError as e:
        raise CompareConfigError(
            "law", law, str(e), "give a shipped law name or an existing law file (lrscale tune / fit)"
        ) from None
    pred = predict(
        loaded,
        params=float(m.num_non_embedding_params()),
        tokens=float(t.steps * batch_tokens),
        batch_tokens=float(batch_tokens),
        width=m.hidden_size,
        depth=m.num_layers,
    )
    for w in pred.warnings:
        logger.warning("compare: law %s: %s", law, w)
    return OfflinePeak(
        peak_lr=float(pred.peak_lr),
        source=f"law {law}",
        interval=(float(pred.interval[0]), float(pred.interval[1])),
        inputs={k: float(v) for k, v in pred.inputs.items()},
        warnings=tuple(pred.warnings),
    )


def offline_peak(cfg: CompareConfig) -> OfflinePeak:
    """The LRScale arms' peak: ``lrscale.peak_lr``, or ``lrscale.law``'s prediction (:func:`law_peak`)."""
    if cfg.lrscale.peak_lr is not None:
        return OfflinePeak(peak_lr=cfg.lrscale.peak_lr, source="lrscale.peak_lr (given)")
    if cfg.lrscale.law is None:
        raise CompareConfigError("lrscale.law", None, "is missing", "give a law or peak_lr")
    return law_peak(cfg, cfg.lrscale.law)


def peaks_for(cfg: CompareConfig) -> dict[str, OfflinePeak]:
    """``{"lrscale": ..., "steplaw": ...}``: the law peaks the arms in ``cfg`` need."""
    out = {"lrscale": offline_peak(cfg)}
    if "steplaw_formula" in cfg.arms:
        out["steplaw"] = law_peak(cfg, cfg.steplaw.law)
    return out


def arm_runs(cfg: CompareConfig, arm: str, peaks: dict[str, OfflinePeak]) -> dict[float, list[RunSpec]]:
    """The runs of one arm, by peak LR (one LR except for the grid)."""
    b = cfg.baseline.lr
    if arm == "cosine":
        lrs, sched = [b], "cosine"
    elif arm == "inverse_sqrt":
        lrs, sched = [b], "inverse_sqrt"
    elif arm == "lrscale_offline":
        lrs, sched = [peaks["lrscale"].peak_lr], "lrscale"
    elif arm == "lrscale_online":
        lrs, sched = [peaks["lrscale"].peak_lr], "lrscale_online"
    elif arm == "steplaw_formula":
        lrs, sched = [peaks["steplaw"].peak_lr], "lrscale"
    elif arm == "schedulefree":
        lrs, sched = [cfg.schedulefree.lr], "schedulefree"
    elif arm == "prodigy":
        lrs, sched = [cfg.prodigy.lr], "prodigy"
    elif arm == "cosine_grid_best":
        if cfg.grid is None:
            raise CompareConfigError("grid", None, "is required with the cosine_grid_best arm", "add a grid")
        lrs, sched = list(cfg.grid.lrs), "cosine"
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return {lr: [RunSpec(sched, float(lr), s) for s in cfg.seeds] for lr in lrs}


def _warmup_cosine(cfg: CompareConfig, floor: float) -> dict[str, Any]:
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


def scheduler_block(cfg: CompareConfig, spec: RunSpec) -> dict[str, Any] | None:
    """The DeepSpeed ``scheduler`` block of one run (``"auto"`` = filled from the training section);
    ``None`` for Schedule-Free (no schedule: its warmup is in the optimizer)."""
    floor = cfg.min_lr_ratio
    if spec.schedule == "cosine":
        return _warmup_cosine(cfg, floor)
    if spec.schedule == "prodigy":
        return _warmup_cosine(cfg, 0.0)  # the authors' CosineAnnealingLR(T_max=total_steps): down to 0
    if spec.schedule == "schedulefree":
        return None
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


def optimizer_block(cfg: CompareConfig, spec: RunSpec, raw: dict[str, Any]) -> dict[str, Any] | None:
    """The LR-free arms' DeepSpeed ``optimizer`` block (a client optimizer, :mod:`.optimizers`) with the
    train config's AdamW betas / eps / weight decay; ``None``: keep the train config's optimizer."""
    from lrscale_megatron.compare.optimizers import PRODIGY, SCHEDULEFREE

    if spec.schedule not in ("schedulefree", "prodigy"):
        return None
    adamw = dict((raw["deepspeed"].get("optimizer") or {}).get("params", {}))
    params: dict[str, Any] = {k: adamw[k] for k in ("betas", "eps", "weight_decay") if k in adamw}
    params["lr"] = "auto"
    if spec.schedule == "schedulefree":
        params["warmup_steps"] = int(raw["training"].get("warmup_steps", 0))
        return {"type": SCHEDULEFREE, "params": params}
    p = cfg.prodigy
    params.update(
        d_coef=p.d_coef, safeguard_warmup=p.safeguard_warmup, use_bias_correction=p.use_bias_correction
    )
    return {"type": PRODIGY, "params": params}


def train_config_for(cfg: CompareConfig, spec: RunSpec) -> TrainConfig:
    """The validated train config of one run."""
    raw, base = base_train_raw(cfg)
    raw = apply_overrides(raw, [f"training.lr={spec.peak_lr!r}", f"training.seed={spec.seed}"])
    ds = {k: v for k, v in raw["deepspeed"].items() if k != "scheduler"}
    sched = scheduler_block(cfg, spec)
    if sched is not None:
        ds["scheduler"] = sched
    opt = optimizer_block(cfg, spec, raw)
    if opt is not None:
        ds["optimizer"] = opt
    raw["deepspeed"] = ds
    return config_from_dict(raw, base_dir=base, source=f"{cfg.source}:{spec.schedule}")


def run_id(spec: RunSpec, tc: TrainConfig) -> str:
    """``<schedule>-lr<peak>-s<seed>-<hash of the full train config>``: a file name and a cache key.

    An online arm's hash covers its online settings *with every default filled in*
    (:class:`~lrscale_megatron.online_config.OnlineConfig`), so a change of a default makes a new key
    instead of serving a run trained under the old one."""
    from lrscale_megatron.online_config import OnlineConfig

    key = tc.to_dict()
    sched = key["deepspeed"].get("scheduler") or {}
    online = (sched.get("params") or {}).get("online") if sched.get("type") == "LRScale" else None
    if online is not None:
        key["online_resolved"] = OnlineConfig.from_dict(online, "scheduler.params.online").to_dict()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{spec.schedule}-lr{spec.peak_lr:.4g}-s{spec.seed}-{digest}"
