"""The sweep config file (``configs/sweep/*.json``) as a pydantic model on the shared config base.

Keys starting with ``_`` are comments; paths are relative to the config file. See
:mod:`lrscale_megatron.sweep.cli` for the format. Every error names the field path, the value, what is
wrong and the fix (:class:`SweepConfigError`, a :class:`~lrscale_megatron.configs.base.ConfigError`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from lrscale_megatron.configs.base import ConfigError, ConfigModel
from lrscale_megatron.sweep.megatron import GPTSweepSettings
from lrscale_megatron.sweep.runner import SweepGrid

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]


class SweepConfigError(ConfigError):
    """A bad sweep config value; the message names the field, the value and the fix."""


class GridModel(ConfigModel):
    """The run grid (:class:`~lrscale_megatron.sweep.runner.SweepGrid`)."""

    error_class = SweepConfigError

    widths: tuple[StrictInt, ...] = Field(strict=False)
    """Hidden sizes."""
    depths: tuple[StrictInt, ...] = Field(strict=False)
    """Layer counts."""
    token_budgets: tuple[StrictFloat, ...] = Field(default=(), strict=False)
    """Training tokens per run (empty with ``tokens_per_param``)."""
    batch_tokens: tuple[StrictInt, ...] = Field(strict=False)
    """Tokens per optimizer step."""
    lr_min: float | None = None
    """Smallest peak LR (or a clamp on the ``lr_center`` law)."""
    lr_max: float | None = None
    """Largest peak LR (or a clamp on the ``lr_center`` law)."""
    n_lr: int = 8
    """Peak LRs per group, log-uniform."""
    seq_len: int = 2048
    """Sequence length in tokens."""
    base: dict[str, Any] = Field(default_factory=dict)
    """Fixed entries copied into every run's config (part of the run id), e.g. ``{"seed": 0}``."""
    lr_center: dict[str, Any] | None = None
    """Prior law centring each group's LR grid: ``{"law": NAME_OR_PATH}`` or ``{"coefficient", "exponents"}``."""
    lr_span: float | None = None
    """Largest / smallest LR of a centred group grid."""
    tokens_per_param: float | None = None
    """Token budget = this x ``12 L h^2`` per run instead of ``token_budgets``."""
    seeds: tuple[StrictInt, ...] = Field(default=(), strict=False)
    """Repeat every run once per seed (the law averages the repeats' losses per LR)."""


class TrainModel(ConfigModel):
    """How sweep points become pretraining configs (:class:`~lrscale_megatron.sweep.megatron.GPTSweepSettings`)."""

    error_class = SweepConfigError

    head_dim: int = 16
    """Attention head size; ``num_heads = width // head_dim``."""
    warmup_fraction: float = 0.05
    """Warmup iterations / iterations."""
    evals: int = 4
    """Validation evaluations per run."""
    eval_batches: int = 4
    """Global batches per evaluation."""
    micro_batch_size: int = 0
    """Sequences per forward pass (0: the whole batch)."""
    threads: int = 1
    """Torch threads per worker process (0: torch's default)."""
    overrides: tuple[str, ...] = Field(default=(), strict=False)
    """Extra ``key.sub=value`` overrides of the base config."""


class SweepFile(ConfigModel):
    """A sweep config file."""

    error_class = SweepConfigError

    store: str = Field(json_schema_extra={"fix": "add 'store': the SQLite path (see `lrscale sweep --help`)"})
    """Path of the SQLite store."""
    csv: str | None = None
    """Where finished runs are exported after the sweep (optional)."""
    workers: int = 1
    """Worker processes (``lrscale sweep`` caps it at the usable cores)."""
    base_config: str = Field(json_schema_extra={"fix": "add 'base_config': a configs/gpt/*.json path"})
    """The base GPT config every run overrides."""
    grid: GridModel
    train: TrainModel = Field(default_factory=TrainModel)


@dataclass(frozen=True)
class SweepConfig:
    """A parsed sweep config file.

    Attributes:
        store: path of the SQLite store.
        grid: the run grid.
        settings: how sweep points become pretraining configs.
        workers: worker processes requested (``lrscale sweep`` caps it at the usable cores).
        csv: where finished runs are exported after the sweep (``None``: not exported).
        source: the config file.
    """

    store: Path
    grid: SweepGrid
    settings: GPTSweepSettings
    workers: int = 1
    csv: Path | None = None
    source: str = "<dict>"


def _resolve(base: Path, p: str) -> str:
    q = Path(p)
    return os.path.normpath(q if q.is_absolute() else (base / q))


_GRID_ERR = re.compile(r"SweepGrid\.([\w.]+)=(.*?); fix: (.*)", re.S)


def _grid_error(e: ValueError, raw: dict[str, Any]) -> SweepConfigError:
    """A :class:`SweepGrid` refusal as a field error."""
    m = _GRID_ERR.search(str(e))
    if m is None:
        return SweepConfigError("grid", "...", str(e), "see the message")
    name = m.group(1)
    value = raw.get(name.split(".")[0], m.group(2)) if "." not in name else m.group(2)
    return SweepConfigError(f"grid.{name}", value, "is invalid", m.group(3))


def parse_sweep_config(raw: dict[str, Any], base_dir: Path, source: str = "<dict>") -> SweepConfig:
    """Validate a sweep config mapping; relative paths are resolved against ``base_dir``.

    Errors name ``SOURCE: field.path``, the value, the problem and the fix."""
    try:
        return _parse(raw, base_dir, source)
    except SweepConfigError as e:
        raise SweepConfigError(f"{source}: {e.field_name}", e.value, e.problem, e.fix) from None


def _parse(raw: dict[str, Any], base_dir: Path, source: str) -> SweepConfig:
    model = SweepFile.from_dict(raw)
    grid_raw = model.grid.model_dump()
    center = grid_raw.get("lr_center")
    if isinstance(center, dict) and "law" in center:
        grid_raw["lr_center"] = _center_from_law(center, base_dir)
    try:
        grid = SweepGrid(**grid_raw)
    except ValueError as e:
        raise _grid_error(e, grid_raw) from None
    store = Path(_resolve(base_dir, model.store))
    base_config = _resolve(base_dir, model.base_config)
    if not Path(base_config).is_file():
        raise SweepConfigError(
            "base_config",
            model.base_config,
            f"not found at {base_config}",
            "give a GPT config path relative to the sweep config",
        )
    try:
        settings = GPTSweepSettings(base_config=base_config, shift_log=str(store), **model.train.model_dump())
    except ValueError as e:
        raise SweepConfigError("train", model.train.to_dict(), str(e), "see the message") from None
    if model.workers < 1:
        raise SweepConfigError("workers", model.workers, "must be >= 1", "use a positive integer")
    csv_path = Path(_resolve(base_dir, model.csv)) if model.csv else None
    return SweepConfig(store, grid, settings, model.workers, csv_path, source)


def _center_from_law(center: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``{"law": NAME_OR_PATH}`` -> the inline ``lr_center`` of that law file (paths relative to the config)."""
    from lrscale_megatron.law.lawfile import LawFileError, load_law
    from lrscale_megatron.sweep.runner import CENTER_PREDICTORS

    if set(center) != {"law"}:
        raise SweepConfigError(
            "grid.lr_center",
            center,
            "gives a law and coefficient/exponents",
            "give either {'law': NAME_OR_PATH} or {'coefficient': c, 'exponents': {...}}, not both",
        )
    ref = str(center["law"])
    path = Path(_resolve(base_dir, ref))
    try:
        law = load_law(str(path) if path.is_file() else ref)
    except (LawFileError, ValueError) as e:
        raise SweepConfigError(
            "grid.lr_center.law", ref, f"cannot be loaded ({e})", "give a law file"
        ) from None
    bad = [p for p in law.predictors if p not in CENTER_PREDICTORS]
    if bad:
        raise SweepConfigError(
            "grid.lr_center.law", ref, f"uses predictors {bad}", f"a law in {CENTER_PREDICTORS} only"
        )
    return {"coefficient": law.coefficient, "exponents": dict(law.exponents), "source": ref}


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config file."""
    p = Path(path)
    if not p.is_file():
        raise SweepConfigError("sweep config", str(p), "not found", "e.g. configs/sweep/cpu-sweep.json")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SweepConfigError(
            "sweep config", str(p), f"is not valid JSON ({e})", "fix the JSON syntax"
        ) from None
    return parse_sweep_config(raw, p.parent, str(p))
