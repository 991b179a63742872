"""The comparison job's typed config: one JSON file (``configs/compare/*.json``), pydantic v2 models on the
shared base (:class:`lrscale_megatron.configs.ConfigModel`: unknown keys with did-you-mean, strict types,
errors naming the field path, the value, the problem and the fix).

    {
      "train_config": "../gpt/cpu-target.json",        # relative to this file
      "overrides": ["training.log_every=100"],         # applied to every arm (not steps/lr/seed/deepspeed)
      "steps": 300, "seeds": [0, 1], "eval_every": 10,
      "output_dir": "out/compare/cpu-demo",
      "baseline": {"lr": 6e-4, "justification": "GPT-3 Small (125M), Brown et al. 2020 Table 2.1"},
      "target": {"rule": "cosine_final", "reduce": "max", "margin": 0.01},
      "lrscale": {"law": "out/tune/cpu-demo/law.json", "online": {"adapt_every": 100}},
      "steplaw": {"law": "steplaw-published"},
      "schedulefree": {"lr": 0.0025}, "prodigy": {"d_coef": 1.0},
      "arms": ["cosine", "inverse_sqrt", "lrscale_offline", "lrscale_online", "steplaw_formula",
               "schedulefree", "prodigy", "cosine_grid_best"],
      "grid": {"lrs": [3e-4, 1e-3, 3e-3, 1e-2]},
      "tune": "out/tune/cpu-demo"                      # the proxy ladder's cost, for compute-to-tuned-LR
    }

Units: ``steps``, ``eval_every`` and ``adapt_every`` count optimizer iterations. Keys starting with ``_``
are comments. JSON schema for editors: ``CompareConfig.json_schema()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, field_validator, model_validator

from lrscale_megatron.compare.arm_config import (
    CompareConfigError,
    LRScaleArmConfig,
    ProdigyArmConfig,
    ScheduleFreeArmConfig,
    SteplawArmConfig,
    _finite_positive,
    _Model,
)

#: Every arm the job knows, in the order it runs them (``cosine`` first: the target may derive from it).
ArmName = Literal[
    "cosine",
    "inverse_sqrt",
    "lrscale_offline",
    "lrscale_online",
    "steplaw_formula",
    "schedulefree",
    "prodigy",
    "cosine_grid_best",
]
ARM_NAMES: tuple[str, ...] = get_args(ArmName)
REQUIRED_ARMS: tuple[str, ...] = ARM_NAMES[:4]
#: Training keys the compare config owns (one path per setting): set them here, not in ``overrides``.
OWNED_KEYS = ("training.steps", "training.lr", "training.seed", "training.eval_every", "deepspeed")


def _list_to_tuple(v: Any) -> Any:
    """JSON has no tuples: accept a list where a tuple is declared (its items stay strictly typed)."""
    return tuple(v) if isinstance(v, list) else v


_Tuple = BeforeValidator(_list_to_tuple)


class BaselineConfig(_Model):
    """The copied LR that the ``cosine`` and ``inverse_sqrt`` arms use."""

    lr: float
    """Peak LR of the baseline arms."""
    justification: str = Field(json_schema_extra={"fix": "say where the baseline LR comes from"})
    """Where the value comes from (a paper table, a framework example default); printed in the report."""
    warmup_type: Literal["linear", "log"] = "linear"
    """DeepSpeed ``WarmupCosineLR`` warmup shape: ``linear`` (LRScale's ramp, so arms differ only in the
    peak and decay) or ``log`` (DeepSpeed's default)."""

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        _finite_positive("lr", v, "give the baseline peak LR, e.g. 6e-4")
        return v

    @field_validator("justification")
    @classmethod
    def _justification(cls, v: str) -> str:
        if len(v.strip()) < 10:
            raise CompareConfigError(
                "justification",
                v,
                "is missing or too short",
                "say where the baseline LR comes from (e.g. 'GPT-3 paper Table 2.1, 125M model')",
            )
        return v


class TargetConfig(_Model):
    """The validation loss every arm races to."""

    rule: Literal["fixed", "cosine_final"] = "cosine_final"
    """``fixed`` (``loss`` as given) or ``cosine_final``: ``reduce`` over the seeds of the ``cosine`` arm's
    final validation loss, times ``1 + margin``."""
    loss: float | None = None
    """The target for ``fixed`` (nats/token)."""
    reduce: Literal["min", "mean", "max"] = "max"
    """Reducer over cosine seeds (``cosine_final`` only)."""
    margin: float = 0.01
    """Relative slack added to the cosine loss (``cosine_final`` only), >= 0."""

    @model_validator(mode="after")
    def _check(self) -> TargetConfig:
        if self.rule == "fixed":
            if self.loss is None:
                raise CompareConfigError("loss", None, "is required with rule='fixed'", "give a loss")
            _finite_positive("loss", self.loss, "give a validation loss in nats/token")
        elif self.loss is not None:
            raise CompareConfigError(
                "loss", self.loss, "is only used with rule='fixed'", "remove it, or set rule='fixed'"
            )
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise CompareConfigError("margin", self.margin, "must be a finite number >= 0", "use 0.01")
        return self

    def describe(self) -> str:
        if self.rule == "fixed":
            return f"fixed at {self.loss}"
        return f"{self.reduce} over seeds of the cosine arm's final val loss x (1 + {self.margin})"


class GridConfig(_Model):
    """The tuned baseline: the ``cosine`` schedule at each LR, all seeds; the best mean final loss wins."""

    lrs: Annotated[tuple[float, ...], _Tuple] = ()
    """Peak LRs (>= 2; a value equal to ``baseline.lr`` reuses the ``cosine`` arm's runs)."""

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) < 2:
            raise CompareConfigError("lrs", list(v), "needs at least 2 LRs", "give e.g. [3e-4, 1e-3, 3e-3]")
        for i, lr in enumerate(v):
            _finite_positive(f"lrs.{i}", lr, "give positive LRs")
        return v


class CompareConfig(_Model):
    """The whole comparison (see the module docstring)."""

    train_config: str
    """The GPT pretraining config every arm trains (path, resolved against ``source``'s folder)."""
    steps: int | None = None
    """Optimizer iterations of every run (equal compute across arms). ``None``: the train config's
    ``training.steps`` (the length ``lrscale tune`` tuned the law for), filled in when loading."""
    seeds: Annotated[tuple[int, ...], _Tuple]
    """One run per seed per arm (``training.seed``: weights and RNG); >= 2 for a spread."""
    baseline: BaselineConfig = Field(
        json_schema_extra={"fix": 'add "baseline": {"lr": ..., "justification": ...}'}
    )
    """The copied LR of the ``cosine`` and ``inverse_sqrt`` arms."""
    overrides: Annotated[tuple[str, ...], _Tuple] = ()
    """``key=value`` edits of the train config for every arm (keys in :data:`OWNED_KEYS` refused)."""
    eval_every: int = 10
    """Iterations between validation losses: the resolution of steps-to-target."""
    output_dir: str = "out/compare"
    """Where ``report.md``, ``report.json``, the PNGs and ``runs/`` go (relative to the cwd)."""
    target: TargetConfig = TargetConfig()
    lrscale: LRScaleArmConfig = LRScaleArmConfig()
    steplaw: SteplawArmConfig = SteplawArmConfig()
    schedulefree: ScheduleFreeArmConfig = ScheduleFreeArmConfig()
    prodigy: ProdigyArmConfig = ProdigyArmConfig()
    arms: Annotated[tuple[ArmName, ...], _Tuple] = REQUIRED_ARMS  # type: ignore[assignment]
    """Which arms to run: the four required ones plus any of ``steplaw_formula``, ``schedulefree``,
    ``prodigy``, ``cosine_grid_best``."""
    grid: GridConfig | None = None
    """The cosine LR grid (required with ``cosine_grid_best``)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine-type decays as a fraction of the peak (GPT-3: 0.1), same for every arm."""
    workers: int = 1
    """Local worker processes that train the runs at once (one process each, single-threaded on CPU; use
    the number of cores). Ignored under torchrun, where every rank trains every run together."""
    tune: str | None = None
    """``lrscale tune``'s output folder (or its ``prediction.json``), relative to the cwd: the proxy
    ladder's cost for the report's compute-to-a-tuned-LR table. ``None``: that table says unknown."""
    source: str = "<dict>"
    """The file this came from (set by :func:`load_compare_config`)."""

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise CompareConfigError("steps", v, "must be an integer >= 2", "give optimizer iterations")
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise CompareConfigError("workers", v, "must be an integer >= 1", "use 1, or the number of cores")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s < 0 for s in v):
            raise CompareConfigError(
                "seeds", list(v), "must be a non-empty list of integers >= 0", "use [0, 1]"
            )
        if len(set(v)) != len(v):
            raise CompareConfigError("seeds", list(v), "has duplicates", "list each seed once")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for o in v:
            if "=" not in o:
                raise CompareConfigError(
                    "overrides", o, "is not key=value", "write e.g. training.micro_batch_size=8"
                )
            key = o.split("=", 1)[0].strip()
            if any(key == k or key.startswith(k + ".") for k in OWNED_KEYS):
                raise CompareConfigError(
                    "overrides",
                    o,
                    f"sets {key}, which the compare config owns",
                    "use steps / seeds / eval_every / baseline / arms",
                )
        return v

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if self.steps is not None and not 1 <= self.eval_every <= self.steps:
            raise CompareConfigError(
                "eval_every",
                self.eval_every,
                f"must be an integer in [1, steps={self.steps}]",
                "use e.g. steps // 20",
            )
        if len(set(self.arms)) != len(self.arms):
            raise CompareConfigError("arms", list(self.arms), "has duplicates", "list each arm once")
        missing = [a for a in REQUIRED_ARMS if a not in self.arms]
        if missing:
            raise CompareConfigError(
                "arms", list(self.arms), f"misses the required arms {missing}", f"list all of {REQUIRED_ARMS}"
            )
        if "cosine_grid_best" in self.arms and self.grid is None:
            raise CompareConfigError(
                "grid", None, "is required with the cosine_grid_best arm", 'add "grid": {"lrs": [...]}'
            )
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise CompareConfigError(
                "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", "use 0.1 (GPT-3)"
            )
        return self

    @property
    def ordered_arms(self) -> tuple[str, ...]:
        return tuple(a for a in ARM_NAMES if a in self.arms)

    def train_config_path(self) -> Path:
        p = Path(self.train_config)
        if p.is_absolute():
            return p
        base = Path(self.source).parent if self.source != "<dict>" else Path.cwd()
        return base / p


def _train_steps(cfg: CompareConfig) -> int:
    """``training.steps`` of the train config file (for ``steps: null``)."""
    path = cfg.train_config_path()
    try:
        steps = json.loads(path.read_text())["training"]["steps"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompareConfigError(
            "steps", None, f"cannot be read from the train config {path} ({e!r})", "give steps explicitly"
        ) from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise CompareConfigError(
            "steps", steps, f"from {path} is not an integer >= 2", "give steps explicitly"
        )
    return steps


def compare_config_from_dict(raw: Any, source: str = "<dict>") -> CompareConfig:
    """Validate a raw mapping (the JSON file's content); ``steps`` defaults to the train config's."""
    if not isinstance(raw, dict):
        raise CompareConfigError("<config>", raw, "must be a JSON object", 'write {"train_config": ..., ...}')
    cfg = CompareConfig.from_dict({**raw, "source": source})
    if cfg.steps is None:
        cfg = CompareConfig.from_dict({**raw, "source": source, "steps": _train_steps(cfg)})
    return cfg


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read ``configs/compare/*.json``, apply ``key=value`` overrides (values parsed as JSON), validate."""
    from lrscale_megatron.train.config import apply_overrides

    p = Path(path)
    if not p.is_file():
        raise CompareConfigError(
            "config", str(path), "file not found", "give a JSON file under configs/compare/"
        )
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CompareConfigError("config", str(path), f"is not valid JSON ({e})", "fix the syntax") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return compare_config_from_dict(raw, source=str(p))
