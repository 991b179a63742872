"""The ``lrscale tune`` config: a target train config, how to derive its proxy ladder, fit and launch.

Either a tune config JSON (``configs/tune/*.json``) or a target train config (``configs/gpt/*.json``)
itself, which gets every default below. Keys starting with ``_`` are comments; paths are relative to the
config file. Example (``configs/tune/cpu-demo.json``)::

    {
      "target": "../gpt/cpu-target.json",
      "ladder": {"widths": [16, 24, 32, 40], "head_dim": 8, "tokens": "fixed",
                 "lr_min": 0.002, "lr_max": 0.032, "n_lr": 7},
      "fit": {"predictors": ["params"], "bootstrap": 200},
      "train": {"evals": 2, "eval_batches": 4},
      "workers": 2
    }

Units: ``tokens_per_param`` is training tokens per non-embedding parameter; ``batch_tokens`` are tokens
per optimizer step; LRs are peak LRs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lrscale_megatron.configs.base import ConfigError, ConfigModel


class TuneConfigError(ConfigError):
    """A bad ``lrscale tune`` setting or target: names the field, the value and the fix."""


class LadderSpec(ConfigModel):
    """How the proxy ladder is derived from the target."""

    error_class = TuneConfigError

    widths: tuple[int, ...] | None = Field(default=None, strict=False)
    """Proxy hidden sizes (multiples of ``head_dim``); ``null``: ``n_proxies`` widths derived from the target."""
    n_proxies: int = 4
    """Proxy widths derived when ``widths`` is null (largest at most ``target / max_params_ratio`` params)."""
    max_params_ratio: float = 9.0
    """Derived ladders: the largest proxy has at most target params / this many non-embedding params."""
    width_step: float = 1.4
    """Derived ladders: ratio between successive proxy widths (rounded to multiples of ``head_dim``)."""
    depths: tuple[int, ...] | None = Field(default=None, strict=False)
    """Proxy layer counts; ``null``: the target's. More than one needs a ``depth`` (or ``params``) law."""
    head_dim: int | None = None
    """Attention head size of the proxies; ``null``: the target's ``hidden_size / num_heads``."""
    tokens: Literal["fixed", "per_param"] = "fixed"
    """``fixed``: every proxy trains on the target's tokens; ``per_param``: ``tokens_per_param`` x params."""
    tokens_per_param: float | None = None
    """With ``tokens: per_param``; ``null``: the target's own tokens per non-embedding parameter."""
    batch_tokens: tuple[int, ...] | None = Field(default=None, strict=False)
    """Tokens per optimizer step of the proxies; ``null``: the target's. Several give a batch term."""
    lr_min: float | None = None
    """Smallest peak LR of the grid; ``null``: the target's ``training.lr`` / 2."""
    lr_max: float | None = None
    """Largest peak LR of the grid; ``null``: the target's ``training.lr`` x 32."""
    n_lr: int = 7
    """Peak LRs per proxy, log-uniform in [lr_min, lr_max]."""
    seeds: int = 1
    """Seeds per (proxy, LR): the law averages their losses per LR (a short run's final loss is noisy)."""
    extend: int = 2
    """Extra grid steps allowed beyond an edge when a proxy's best LR sits at the grid's edge (0: none)."""

    @field_validator("n_proxies", "n_lr")
    @classmethod
    def _at_least_3(cls, v: int, info: Any) -> int:
        if v < 3:
            raise TuneConfigError(info.field_name, v, "must be >= 3", "use e.g. 4 proxies and 7 LRs")
        return v

    @field_validator("max_params_ratio", "width_step")
    @classmethod
    def _above_one(cls, v: float, info: Any) -> float:
        if not v > 1.0:
            raise TuneConfigError(info.field_name, v, "must be > 1", "use e.g. 9 (ratio) or 1.4 (step)")
        return v

    @field_validator("extend")
    @classmethod
    def _nonneg(cls, v: int) -> int:
        if v < 0:
            raise TuneConfigError("extend", v, "must be >= 0", "use 0 (never extend) or e.g. 2")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int) -> int:
        if v < 1:
            raise TuneConfigError("seeds", v, "must be >= 1", "use 1, or 2 to average noisy short runs")
        return v

    @model_validator(mode="after")
    def _check(self) -> LadderSpec:
        for name in ("widths", "depths", "batch_tokens"):
            vals = getattr(self, name)
            if vals is not None and (not vals or any(v < 1 for v in vals) or len(set(vals)) != len(vals)):
                raise TuneConfigError(name, list(vals), "must be distinct positive integers", "or null")
        if self.widths is not None and len(self.widths) * len(self.depths or (1,)) < 3:
            raise TuneConfigError(
                "widths", list(self.widths), "gives fewer than 3 proxies", "give at least 3 widths"
            )
        for name in ("lr_min", "lr_max", "tokens_per_param"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise TuneConfigError(name, v, "must be positive", "give a positive number or null")
        if self.lr_min is not None and self.lr_max is not None and not self.lr_min < self.lr_max:
            raise TuneConfigError(
                "lr_max", self.lr_max, f"must exceed lr_min={self.lr_min}", "widen the LR range"
            )
        if self.tokens_per_param is not None and self.tokens != "per_param":
            raise TuneConfigError(
                "tokens_per_param",
                self.tokens_per_param,
                "is set with tokens='fixed'",
                "set tokens: per_param",
            )
        return self


class FitSpec(ConfigModel):
    """How the law is fitted to the ladder (as ``lrscale fit``)."""

    error_class = TuneConfigError

    predictors: tuple[Literal["width", "depth", "params", "tokens", "batch"], ...] | None = Field(
        default=None, strict=False
    )
    """Law predictors; ``null``: ``params`` plus ``batch`` when the ladder has several batch sizes."""
    bootstrap: int = 200
    """Bootstrap resamples (whole proxies) for the interval."""
    seed: int = 0
    """Seed of the bootstrap."""
    method: Literal["argmin", "parabola", "lsq5", "band"] = "parabola"
    """eta* extraction per proxy (see ``lrscale_megatron.law.optimum``)."""
    regressor: Literal["huber", "ols"] = "ols"
    """Regression of log eta* on log predictors: ``ols`` by default (a ladder has a handful of optima, too few
    for Huber's joint scale estimate to down-weight anything reliably; 200 bootstrap Huber fits also cost
    minutes on a busy CPU), ``huber`` for long ladders with outliers."""
    loss: Literal["val", "train"] = "val"
    """Which final loss locates each proxy's optimum (never mixed within one curve)."""


class TrainSpec(ConfigModel):
    """How ladder points become pretraining runs (``configs/sweep`` ``train`` section)."""

    error_class = TuneConfigError

    warmup_fraction: float | None = None
    """Warmup iterations / iterations; ``null``: the target's ``warmup_steps / steps``."""
    evals: int = 2
    """Validation evaluations per proxy run (the last at the final step)."""
    eval_batches: int = 4
    """Global batches per validation evaluation."""
    threads: int = 1
    """Torch threads per worker process."""
    overrides: tuple[str, ...] = Field(default=(), strict=False)
    """Extra ``key.sub=value`` overrides of the target config for every proxy."""


class SlurmSpec(ConfigModel):
    """``launcher: slurm``: one sbatch job array, one ladder run per array task."""

    error_class = TuneConfigError

    partition: str | None = None
    """``#SBATCH --partition``; ``null``: the cluster's default."""
    time_min: int = 60
    """``#SBATCH --time`` in minutes per array task."""
    cpus_per_task: int = 1
    """``#SBATCH --cpus-per-task``."""
    gpus_per_task: int = 0
    """``#SBATCH --gpus-per-task`` (0: none)."""
    max_parallel: int = 0
    """Array throttle (``--array=...%N``); 0: no limit."""
    sbatch_lines: tuple[str, ...] = Field(default=(), strict=False)
    """Extra ``#SBATCH`` options, e.g. ``["--account=proj", "--qos=short"]``."""
    setup: tuple[str, ...] = Field(default=(), strict=False)
    """Shell lines run before each task (``module load ...``, ``source venv/bin/activate``)."""
    python: str | None = None
    """Python interpreter on the compute nodes; ``null``: the head's ``sys.executable``."""
    heartbeat_s: float = 30.0
    """How often a running task stamps its heartbeat file."""
    stale_after_s: float = 600.0
    """A run whose heartbeat is older than this (and has no result) is redone."""
    poll_s: float = 30.0
    """How often the head looks at the result and heartbeat files."""
    max_resubmits: int = 3
    """How many times a run lost with its node is submitted again before the tune gives up."""

    @model_validator(mode="after")
    def _check(self) -> SlurmSpec:
        if not self.stale_after_s > 2 * self.heartbeat_s:
            raise TuneConfigError(
                "stale_after_s",
                self.stale_after_s,
                f"must exceed 2 x heartbeat_s={self.heartbeat_s}",
                "raise stale_after_s (e.g. 20 x heartbeat_s) so a slow write is not taken for a dead node",
            )
        return self


class TuneConfig(ConfigModel):
    """A ``lrscale tune`` config (see the module docstring)."""

    error_class = TuneConfigError

    target: str
    """The target train config (``configs/gpt/*.json``), relative to this file."""
    target_overrides: tuple[str, ...] = Field(default=(), strict=False)
    """``key.sub=value`` overrides of the target config (e.g. ``training.steps=24``); proxies inherit them."""
    ladder: LadderSpec = Field(default_factory=LadderSpec)
    fit: FitSpec = Field(default_factory=FitSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    workers: int = 2
    """Local worker processes (capped at the usable cores)."""
    launcher: Literal["local", "slurm"] = "local"
    """``local``: worker processes on this machine; ``slurm``: an sbatch array (see ``slurm``)."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    source: str = "<dict>"
    """Where the config came from (set by :func:`load_tune_config`)."""


def load_tune_config(path: str | Path) -> TuneConfig:
    """A tune config JSON, or a target train config (``"model"`` key) with every tune default.

    The returned ``target`` is an absolute, normalised path.
    """
    p = Path(path)
    if not p.is_file():
        raise TuneConfigError(
            "config",
            str(path),
            "file not found",
            "give a tune config (configs/tune/*.json) or a target train config (configs/gpt/*.json)",
        )
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TuneConfigError("config", str(p), f"is not valid JSON ({e})", "fix the JSON syntax") from None
    if isinstance(raw, dict) and "model" in raw and "target" not in raw:
        raw = {"target": p.name}
    if not isinstance(raw, dict):
        raise TuneConfigError("config", str(p), "must be a JSON object", 'write {"target": ...}')
    raw = {**raw, "source": str(p)}
    cfg = TuneConfig.from_dict(raw)
    target = Path(cfg.target)
    target = target if target.is_absolute() else (p.parent / target)
    return cfg.replace(target=str(target.resolve()))
