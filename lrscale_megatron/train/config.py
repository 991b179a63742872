"""The pretraining job's typed config: one JSON file, pydantic models, errors that name the field.

A config file (``configs/gpt/*.json``) has five sections (:mod:`lrscale_megatron.train.sections`) and an
optional ``deepspeed`` reference::

    {
      "model":      {"name": "gpt-125m", "vocab_size": 50304, "seq_length": 2048, "hidden_size": 768,
                     "num_layers": 12, "num_heads": 12},
      "data":       {"corpus": "shakespeare", "tokenizer": "byte"},          # or train/valid prefixes
      "parallel":   {"tp": 1, "pp": 1, "world_size": 8},
      "training":   {"steps": 20, "global_batch_size": 8, "micro_batch_size": 4, "lr": 6e-4,
                     "lr_source": "GPT-3 paper, Table 2.1", "warmup_steps": 2},
      "checkpoint": {"dir": null, "save_every": 0, "load": null},
      "deepspeed":  "../deepspeed/cpu-adamw-lrscale.json"                  # path (relative to this file) or inline
    }

Keys starting with ``_`` (``"_comment"``) are ignored. Every other unknown key is an error. Editors get
the JSON schema from ``lrscale schema train``.

The DeepSpeed JSON owns the optimizer, ZeRO stage, gradient clipping, precision and scheduler. Values
written ``"auto"`` there are filled from this config (single source of truth): batch sizes, the optimizer
``lr`` and the scheduler's peak LR / warmup / total steps, LRScale's ``model`` sizes. Batch sizes are always
derived here; a number in the DeepSpeed JSON that disagrees is an error naming both fields.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from lrscale_megatron.configs.base import ConfigError, ConfigModel, strip_comments
from lrscale_megatron.configs.files import apply_overrides as _apply_overrides
from lrscale_megatron.configs.files import read_json_file
from lrscale_megatron.train.sections import (
    DTYPES,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "DTYPES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "load_deepspeed_json",
]


def _path_or_object(schema: dict[str, Any]) -> None:
    """In the file, ``deepspeed`` is a JSON path or an inline object (the model holds the loaded object)."""
    schema.pop("type", None)
    schema.pop("additionalProperties", None)
    schema["anyOf"] = [{"type": "string"}, {"type": "object"}]


class TrainConfig(ConfigModel):
    """The whole pretraining job: five sections and the DeepSpeed JSON (loaded, ``"auto"`` not yet
    filled). ``source`` (the file it came from) is kept beside the fields, not in them."""

    model: ModelConfig
    """GPT shape."""
    data: DataConfig = DataConfig()
    """Corpus or megatron prefixes."""
    parallel: ParallelConfig = ParallelConfig()
    """TP x PP x DP layout."""
    training: TrainingConfig
    """Steps, batch sizes, LR, dtype, evaluation and logging."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Saving and resuming."""
    deepspeed: dict[str, Any] = Field(default_factory=dict, json_schema_extra=_path_or_object)
    """The DeepSpeed JSON (a path relative to the config file, or inline): optimizer, ZeRO, precision,
    scheduler."""
    _source: str = PrivateAttr("<dict>")

    @property
    def source(self) -> str:
        """The config file this came from (``"<dict>"`` when built from a mapping)."""
        return self._source

    @property
    def pipeline(self) -> bool:
        return self.parallel.pp > 1

    @model_validator(mode="after")
    def _across_sections(self) -> TrainConfig:
        m, p, d = self.model, self.parallel, self.data
        if m.arch != "gpt":  # mixer / vit: their own rules (lrscale_megatron.models.arch)
            from lrscale_megatron.models.arch import check_arch

            check_arch(self)
        text = m.arch != "vit"
        if m.num_layers % p.pp:
            raise ConfigError(
                "parallel.pp",
                p.pp,
                f"does not divide model.num_layers({m.num_layers})",
                "pick pp dividing the layer count",
            )
        if m.num_heads % p.tp:
            raise ConfigError(
                "parallel.tp",
                p.tp,
                f"does not divide model.num_heads({m.num_heads})",
                "pick tp dividing the head count",
            )
        if m.vocab_size % p.tp:
            raise ConfigError(
                "model.vocab_size",
                m.vocab_size,
                f"is not divisible by parallel.tp({p.tp})",
                f"pad it to a multiple of {128 * p.tp}",
            )
        if text and d.corpus is not None and d.tokenizer == "bpe" and d.tokenizer_vocab_size > m.vocab_size:
            raise ConfigError(
                "data.tokenizer_vocab_size",
                d.tokenizer_vocab_size,
                f"exceeds model.vocab_size({m.vocab_size})",
                "raise model.vocab_size or shrink the BPE",
            )
        if text and d.corpus is not None and d.tokenizer == "byte" and m.vocab_size < 258:
            raise ConfigError(
                "model.vocab_size",
                m.vocab_size,
                "is below the byte tokenizer's 258 ids",
                "use vocab_size >= 258 (e.g. 264)",
            )
        if p.world_size is not None:
            self.check_batch(p.resolve_dp(p.world_size))
        self._check_deepspeed()
        self._check_lambada()
        return self

    def _check_lambada(self) -> None:
        d = self.data
        if d.lambada_passages and self.model.arch == "vit":
            raise ConfigError(
                "data.lambada_passages",
                d.lambada_passages,
                "is a language-model metric; model.arch='vit' classifies images",
                "set data.lambada_passages to 0 or null",
            )
        if d.lambada_passages and d.corpus is None:
            raise ConfigError(
                "data.lambada_passages",
                d.lambada_passages,
                "needs raw text, but the data are megatron prefixes (no shipped corpus)",
                "set data.lambada_passages to 0 or null, or train on a shipped corpus",
            )
        if d.lambada_passages and self.parallel.pp > 1:
            raise ConfigError(
                "data.lambada_passages",
                d.lambada_passages,
                f"is scored on one model replica's logits, not with parallel.pp={self.parallel.pp}",
                "set data.lambada_passages to 0 or null (off under pipeline parallelism)",
            )
        if d.lambada_source == "shift" and d.shift is None and self.lambada_passages:
            raise ConfigError(
                "data.lambada_source", "shift", "there is no shift corpus (data.shift is null)", "use 'valid'"
            )

    @property
    def lambada_passages(self) -> int:
        """Passages to score at the end (0: none): ``data.lambada_passages`` with ``null`` resolved."""
        d = self.data
        if d.lambada_passages is not None:
            return d.lambada_passages
        return 64 if d.corpus is not None and self.parallel.pp == 1 and self.model.arch != "vit" else 0

    def _check_deepspeed(self) -> None:
        ds, p = self.deepspeed, self.parallel
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if self.pipeline and stage != 0:
            raise ConfigError(
                "deepspeed.zero_optimization.stage",
                stage,
                f"must be 0 with parallel.pp={p.pp} (the loop runs megatron's pipeline schedule "
                "and steps the engine's optimizer itself)",
                "use stage 0, or pp=1 for ZeRO 1/2",
            )
        if self.pipeline and (ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")):
            raise ConfigError(
                "deepspeed.bf16.enabled",
                True,
                f"is not supported with parallel.pp={p.pp}: DeepSpeed's mixed-precision optimizer takes "
                "gradients from its own hooks, before the loop's pipeline reductions",
                "use pp=1 with tp/ZeRO-1 for bf16, or float32 with pp>1",
            )
        if stage not in (0, 1, 2):
            raise ConfigError(
                "deepspeed.zero_optimization.stage",
                stage,
                "is not supported with megatron tensor-parallel modules here"
                if stage == 3
                else "is not a ZeRO stage",
                "use stage 0, 1 or 2",
            )
        if self.training.lr is None and _has_auto(ds, ("optimizer", "params", "lr")):
            raise ConfigError(
                "training.lr",
                None,
                "is needed: the DeepSpeed optimizer lr is 'auto'",
                "set training.lr (the baseline peak LR)",
            )

    def check_batch(self, dp: int) -> int:
        """Gradient-accumulation steps per rank (micro-batches per iteration) for ``dp`` replicas."""
        t = self.training
        per_rank = t.global_batch_size // dp
        if t.global_batch_size % dp or per_rank % t.micro_batch_size:
            raise ConfigError(
                "training.global_batch_size",
                t.global_batch_size,
                f"is not divisible by micro_batch_size({t.micro_batch_size}) * dp({dp}) = {t.micro_batch_size * dp}",
                f"use a multiple of {t.micro_batch_size * dp}",
            )
        return per_rank // t.micro_batch_size

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` (sections as models or mappings); keeps ``source``."""
        out = type(self).from_dict({**self.model_dump(), **changes})
        out._source = self._source
        return out


def _has_auto(d: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur:
            return False
        cur = cur[k]
    return cur == "auto"


def config_from_dict(
    raw: Mapping[str, Any], base_dir: str | Path | None = None, source: str = "<dict>"
) -> TrainConfig:
    """Validate a raw mapping (the JSON file's content, overrides applied); a ``deepspeed`` path is
    read relative to ``base_dir``."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<config>", raw, "must be a JSON object", 'write {"model": ..., "training": ...}')
    raw = dict(raw)
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = load_deepspeed_json(raw["deepspeed"], base_dir)
    elif isinstance(raw.get("deepspeed"), Mapping):
        raw["deepspeed"] = copy.deepcopy(dict(raw["deepspeed"]))
    elif "deepspeed" in raw:
        raise ConfigError(
            "deepspeed", raw["deepspeed"], "must be a mapping or a JSON path", "see configs/deepspeed/"
        )
    cfg = TrainConfig.from_dict(raw)
    cfg._source = source
    return cfg


def load_deepspeed_json(path: str, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` (relative to ``base_dir``, else to the working directory), ``_``-keys
    dropped."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path(base_dir or ".") / p, Path.cwd() / p]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(
            "deepspeed",
            path,
            f"file not found (looked at {[str(c) for c in candidates]})",
            "give a path relative to the config file, or inline the DeepSpeed JSON",
        )
    return strip_comments(read_json_file(found, "", field="deepspeed"))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` (value parsed as JSON, else kept as a string) into a copy of ``raw``.

    ``deepspeed.*`` keys reach into the DeepSpeed JSON when it is inline (:func:`load_config` loads a
    path first).
    """
    return _apply_overrides(raw, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON config, apply ``overrides`` (``key=value``), validate."""
    p = Path(path)
    raw = read_json_file(p, "give the path of a JSON config (configs/gpt/*.json)")
    if overrides and isinstance(raw, dict):
        if isinstance(raw.get("deepspeed"), str) and any(o.startswith("deepspeed.") for o in overrides):
            raw["deepspeed"] = load_deepspeed_json(raw["deepspeed"], p.parent)
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, base_dir=p.parent, source=str(p))
