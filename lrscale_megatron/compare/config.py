"""The comparison job's typed config: one JSON file (``configs/compare/*.json``), frozen dataclasses.

    {
      "train_config": "../gpt/cpu-tiny.json",         # relative to this file
      "overrides": ["training.micro_batch_size=8"],   # applied to every arm (not steps/lr/seed/deepspeed)
      "steps": 100, "seeds": [0, 1], "eval_every": 10,
      "output_dir": "out/compare/cpu-demo",
      "baseline": {"lr": 6e-4, "justification": "GPT-3 Small (125M), Brown et al. 2020 Table 2.1"},
      "target": {"rule": "cosine_final", "reduce": "max", "margin": 0.01},
      "lrscale": {"law": "steplaw-dense", "online": {"enabled": true, "adapt_every": 25}},
      "arms": ["cosine", "inverse_sqrt", "lrscale_offline", "lrscale_online", "cosine_grid_best"],
      "grid": {"lrs": [3e-4, 1e-3, 3e-3, 1e-2]}
    }

Units: ``steps``, ``eval_every`` and ``adapt_every`` count optimizer iterations. Keys starting with ``_``
are comments. Every error names the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Every arm the job knows, in the order it runs them (``cosine`` first: the target may derive from it).
ARM_NAMES: tuple[str, ...] = (
    "cosine",
    "inverse_sqrt",
    "lrscale_offline",
    "lrscale_online",
    "cosine_grid_best",
)
REQUIRED_ARMS: tuple[str, ...] = ARM_NAMES[:4]
TARGET_RULES = ("fixed", "cosine_final")
REDUCERS = ("min", "mean", "max")
#: Training keys the compare config owns (one path per setting): set them here, not in ``overrides``.
OWNED_KEYS = ("training.steps", "training.lr", "training.seed", "training.eval_every", "deepspeed")


class CompareConfigError(ValueError):
    """A bad compare-config value: names the field, the value, what is wrong and the fix."""

    def __init__(self, field_name: str, value: Any, problem: str, fix: str) -> None:
        self.field_name, self.value, self.problem, self.fix = field_name, value, problem, fix
        super().__init__(f"{field_name}={value!r}: {problem}. Fix: {fix}")


def _finite_positive(where: str, v: Any, fix: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise CompareConfigError(where, v, "must be a finite number > 0", fix)


@dataclass(frozen=True)
class BaselineConfig:
    """The hand-set baseline LR that the ``cosine`` and ``inverse_sqrt`` arms use.

    Attributes:
        lr: peak LR of the baseline arms.
        justification: where the value comes from (a paper table, a framework example default); required,
            printed in the report next to the number.
        warmup_type: DeepSpeed ``WarmupCosineLR`` warmup shape for the ``cosine`` arms: ``linear`` (the
            same ramp as LRScale's, so arms differ only in the peak and decay) or ``log`` (DeepSpeed's
            default).
    """

    lr: float
    justification: str
    warmup_type: str = "linear"

    def __post_init__(self) -> None:
        _finite_positive("baseline.lr", self.lr, "give the baseline peak LR, e.g. 6e-4")
        if not isinstance(self.justification, str) or len(self.justification.strip()) < 10:
            raise CompareConfigError(
                "baseline.justification",
                self.justification,
                "is missing or too short",
                "say where the baseline LR comes from (e.g. 'GPT-3 paper Table 2.1, 125M model')",
            )
        if self.warmup_type not in ("linear", "log"):
            raise CompareConfigError(
                "baseline.warmup_type", self.warmup_type, "unknown warmup", "use 'linear' or 'log'"
            )


@dataclass(frozen=True)
class TargetConfig:
    """The validation loss every arm races to.

    Attributes:
        rule: ``fixed`` (``loss`` as given) or ``cosine_final``: ``reduce`` over the seeds of the ``cosine``
            arm's final validation loss, times ``1 + margin``. With ``reduce = "max"`` every cosine seed
            reaches the target within its budget, so the baseline's steps-to-target is always defined.
        loss: the target for ``fixed`` (nats/token).
        reduce: ``min`` | ``mean`` | ``max`` over cosine seeds (``cosine_final`` only).
        margin: relative slack added to the cosine loss (``cosine_final`` only), >= 0.
    """

    rule: str = "cosine_final"
    loss: float | None = None
    reduce: str = "max"
    margin: float = 0.01

    def __post_init__(self) -> None:
        if self.rule not in TARGET_RULES:
            raise CompareConfigError("target.rule", self.rule, "unknown rule", f"use one of {TARGET_RULES}")
        if self.rule == "fixed":
            if self.loss is None:
                raise CompareConfigError("target.loss", None, "is required with rule='fixed'", "give a loss")
            _finite_positive("target.loss", self.loss, "give a validation loss in nats/token")
        elif self.loss is not None:
            raise CompareConfigError(
                "target.loss", self.loss, "is only used with rule='fixed'", "remove it, or set rule='fixed'"
            )
        if self.reduce not in REDUCERS:
            raise CompareConfigError(
                "target.reduce", self.reduce, "unknown reducer", f"use one of {REDUCERS}"
            )
        if (
            isinstance(self.margin, bool)
            or not isinstance(self.margin, (int, float))
            or not math.isfinite(self.margin)
            or self.margin < 0
        ):
            raise CompareConfigError("target.margin", self.margin, "must be a finite number >= 0", "use 0.01")

    def describe(self) -> str:
        if self.rule == "fixed":
            return f"fixed at {self.loss}"
        return f"{self.reduce} over seeds of the cosine arm's final val loss x (1 + {self.margin})"


@dataclass(frozen=True)
class LRScaleArmConfig:
    """How the LRScale arms get their peak.

    Attributes:
        law: preset name or law-file path; the peak is ``lrscale_megatron.law.predict`` for the model's
            non-embedding parameters, the run's tokens and the batch tokens (exclusive with ``peak_lr``).
        peak_lr: an explicit offline peak instead of a law.
        decay_style: LRScale decay for both LRScale arms (``cosine`` | ``inverse_sqrt`` | ``wsd`` |
            ``constant`` | ``linear``).
        online: the ``online`` block of the scheduler params for ``lrscale_online``
            (:class:`lrscale_megatron.adapter.OnlineConfig`; ``enabled`` is forced to true).
    """

    law: str | None = "steplaw-dense"
    peak_lr: float | None = None
    decay_style: str = "cosine"
    online: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.law is None) == (self.peak_lr is None):
            raise CompareConfigError(
                "lrscale.law",
                self.law,
                f"give exactly one of law and peak_lr (peak_lr={self.peak_lr})",
                "keep one",
            )
        if self.peak_lr is not None:
            _finite_positive("lrscale.peak_lr", self.peak_lr, "give a peak LR or use law")
        from lrscale_megatron.schedule import DECAY_STYLES

        if self.decay_style not in DECAY_STYLES:
            raise CompareConfigError(
                "lrscale.decay_style", self.decay_style, "unknown decay style", f"use one of {DECAY_STYLES}"
            )
        if not isinstance(self.online, Mapping):
            raise CompareConfigError(
                "lrscale.online", self.online, "must be a mapping", 'write "online": {...}'
            )


@dataclass(frozen=True)
class GridConfig:
    """The tuned baseline: the ``cosine`` schedule at each LR, all seeds; the best mean final loss wins.

    Attributes:
        lrs: peak LRs (>= 2; a value equal to ``baseline.lr`` reuses the ``cosine`` arm's runs).
    """

    lrs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.lrs) < 2:
            raise CompareConfigError(
                "grid.lrs", list(self.lrs), "needs at least 2 LRs", "give e.g. [3e-4, 1e-3, 3e-3]"
            )
        for i, lr in enumerate(self.lrs):
            _finite_positive(f"grid.lrs[{i}]", lr, "give positive LRs")


@dataclass(frozen=True)
class CompareConfig:
    """The whole comparison (see the module docstring).

    Attributes:
        train_config: the GPT pretraining config every arm trains (path, resolved against ``source``'s folder).
        overrides: ``key=value`` edits of the train config for every arm (keys in :data:`OWNED_KEYS` refused).
        steps: optimizer iterations of every run (equal compute across arms).
        seeds: one run per seed per arm (``training.seed``: weights and RNG); >= 2 for a spread.
        eval_every: iterations between validation losses: the resolution of steps-to-target.
        output_dir: where ``report.md``, ``report.json``, the PNGs and ``runs/`` go (relative to the cwd).
        baseline, target, lrscale, grid: see their classes.
        arms: which arms to run (the four required ones, plus ``cosine_grid_best`` optionally).
        min_lr_ratio: floor of the cosine-type decays as a fraction of the peak (GPT-3: 0.1), same for
            every arm.
        source: the file this came from.
    """

    train_config: str
    steps: int
    seeds: tuple[int, ...]
    baseline: BaselineConfig
    overrides: tuple[str, ...] = ()
    eval_every: int = 10
    output_dir: str = "out/compare"
    target: TargetConfig = field(default_factory=TargetConfig)
    lrscale: LRScaleArmConfig = field(default_factory=LRScaleArmConfig)
    arms: tuple[str, ...] = REQUIRED_ARMS
    grid: GridConfig | None = None
    min_lr_ratio: float = 0.1
    source: str = "<dict>"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 2:
            raise CompareConfigError(
                "steps", self.steps, "must be an integer >= 2", "give optimizer iterations"
            )
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise CompareConfigError(
                "seeds", list(self.seeds), "must be a non-empty list of integers >= 0", "use [0, 1]"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise CompareConfigError("seeds", list(self.seeds), "has duplicates", "list each seed once")
        if (
            isinstance(self.eval_every, bool)
            or not isinstance(self.eval_every, int)
            or not 1 <= self.eval_every <= self.steps
        ):
            raise CompareConfigError(
                "eval_every",
                self.eval_every,
                f"must be an integer in [1, steps={self.steps}]",
                "use e.g. steps // 20",
            )
        unknown = [a for a in self.arms if a not in ARM_NAMES]
        if unknown:
            raise CompareConfigError(
                "arms", list(self.arms), f"unknown arms {unknown}", f"use names from {ARM_NAMES}"
            )
        missing = [a for a in REQUIRED_ARMS if a not in self.arms]
        if missing:
            raise CompareConfigError(
                "arms", list(self.arms), f"misses the required arms {missing}", "list all four"
            )
        if "cosine_grid_best" in self.arms and self.grid is None:
            raise CompareConfigError(
                "grid", None, "is required with the cosine_grid_best arm", 'add "grid": {"lrs": [...]}'
            )
        for o in self.overrides:
            key = o.split("=", 1)[0].strip()
            if "=" not in o:
                raise CompareConfigError(
                    "overrides", o, "is not key=value", "write e.g. training.micro_batch_size=8"
                )
            if any(key == k or key.startswith(k + ".") for k in OWNED_KEYS):
                raise CompareConfigError(
                    "overrides",
                    o,
                    f"sets {key}, which the compare config owns",
                    "use steps / seeds / eval_every / baseline / arms",
                )
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            raise CompareConfigError(
                "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", "use 0.1 (GPT-3)"
            )

    @property
    def ordered_arms(self) -> tuple[str, ...]:
        return tuple(a for a in ARM_NAMES if a in self.arms)

    def train_config_path(self) -> Path:
        p = Path(self.train_config)
        if p.is_absolute():
            return p
        base = Path(self.source).parent if self.source != "<dict>" else Path.cwd()
        return base / p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("seeds", "overrides", "arms"):
            d[k] = list(d[k])
        if d["grid"] is not None:
            d["grid"]["lrs"] = list(d["grid"]["lrs"])
        return d


_SUB = {"baseline": BaselineConfig, "target": TargetConfig, "lrscale": LRScaleArmConfig, "grid": GridConfig}


def _section(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise CompareConfigError(where, raw, "must be a mapping", f'write "{where}": {{...}}')
    names = [f.name for f in dataclasses.fields(cls)]
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k.startswith("_"):
            continue
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            raise CompareConfigError(
                f"{where}.{k}",
                v,
                "unknown key",
                f"known keys: {names}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            )
        kw[k] = tuple(v) if isinstance(v, list) else v
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CompareConfigError(where, dict(raw), f"missing required keys {missing}", f"add {missing}")
    return cls(**kw)


def compare_config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> CompareConfig:
    """Validate a raw mapping (the JSON file's content)."""
    if not isinstance(raw, Mapping):
        raise CompareConfigError("<config>", raw, "must be a JSON object", 'write {"train_config": ..., ...}')
    top = {k: v for k, v in raw.items() if not k.startswith("_")}
    for k, cls in _SUB.items():
        if k in top and top[k] is not None:
            top[k] = _section(cls, top[k], k)
    if "baseline" not in top:
        raise CompareConfigError(
            "baseline", None, "section is missing", 'add "baseline": {"lr": ..., "justification": ...}'
        )
    return _section(CompareConfig, {**top, "source": source}, "<config>")


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
