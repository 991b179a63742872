"""The pretraining job's typed config: one JSON file, frozen dataclasses, errors that name the field.

A config file (``configs/gpt/*.json``) has five sections and an optional ``deepspeed`` reference::

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

Keys starting with ``_`` (``"_comment"``) are ignored. Every other unknown key is an error.

The DeepSpeed JSON owns the optimizer, ZeRO stage, gradient clipping, precision and scheduler. Values
written ``"auto"`` there are filled from this config (single source of truth): batch sizes, the optimizer
``lr`` and the scheduler's peak LR / warmup / total steps, LRScale's ``model`` sizes. Batch sizes are always
derived here; a number in the DeepSpeed JSON that disagrees is an error naming both fields.

Units: ``training.steps``, ``warmup_steps``, ``eval_every``, ``save_every`` count optimizer iterations;
``global_batch_size`` and ``micro_batch_size`` count sequences.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float64", "bfloat16")


class ConfigError(ValueError):
    """A bad config value: names the field, the value, what is wrong and the fix."""

    def __init__(self, field_name: str, value: Any, problem: str, fix: str) -> None:
        self.field_name, self.value, self.problem, self.fix = field_name, value, problem, fix
        super().__init__(f"{field_name}={value!r}: {problem}. Fix: {fix}")


def _positive_int(where: str, v: Any, fix: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(where, v, "must be a positive integer", fix)


def _nonneg_int(where: str, v: Any, fix: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(where, v, "must be an integer >= 0", fix)


@dataclass(frozen=True)
class ModelConfig:
    """GPT shape (megatron-core ``GPTModel``, learned absolute positions, pre-LayerNorm, GeLU MLP).

    Attributes:
        name: label used in logs and output paths.
        vocab_size: embedding rows; pad it to a multiple of 128 x tp (50257 -> 50304 for GPT-2 BPE).
        seq_length: tokens per sample.
        hidden_size, num_layers, num_heads: the transformer shape.
        ffn_hidden_size: MLP width; 0 means 4 x hidden_size.
        tie_embeddings: share the input embedding with the output layer (GPT-2/3 do).
        init: ``global_name`` (every parameter drawn from ``(seed, global name)`` at full shape, so any
            TP x PP layout starts from the same weights; CPU/small models) or ``megatron`` (megatron's
            own init on the device; large models).
        transformer_impl: ``local`` (megatron local spec), ``transformer_engine`` (TE spec; an error without
            CUDA and ``transformer_engine``) or ``auto`` (TE when both are present, else local).
    """

    name: str
    vocab_size: int
    seq_length: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int = 0
    tie_embeddings: bool = True
    init: str = "global_name"
    transformer_impl: str = "local"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads"):
            _positive_int(f"model.{f}", getattr(self, f), "give a positive integer")
        _nonneg_int("model.ffn_hidden_size", self.ffn_hidden_size, "use 0 for 4 x hidden_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "model.num_heads",
                self.num_heads,
                f"does not divide hidden_size({self.hidden_size})",
                "pick a head count that divides hidden_size",
            )
        if self.init not in ("global_name", "megatron"):
            raise ConfigError("model.init", self.init, "unknown init", "use 'global_name' or 'megatron'")
        if self.transformer_impl not in ("local", "transformer_engine", "auto"):
            raise ConfigError(
                "model.transformer_impl",
                self.transformer_impl,
                "unknown implementation",
                "use 'local', 'transformer_engine' or 'auto'",
            )

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def num_params(self) -> int:
        """Exact parameter count of the megatron local-spec GPTModel (tied embedding counted once):
        ``L * (4h^2 + 2hf + 9h + f) + (V + S) * h + 2h`` (+ ``V * h`` untied), ``f`` the MLP width."""
        h, f, L = self.hidden_size, self.ffn, self.num_layers
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        out = 0 if self.tie_embeddings else self.vocab_size * h
        return L * per_layer + (self.vocab_size + self.seq_length) * h + 2 * h + out

    def num_non_embedding_params(self) -> int:
        """Parameters outside the word and position embeddings (what the LR laws are fitted on)."""
        emb = (self.vocab_size + self.seq_length) * self.hidden_size
        return self.num_params() - emb - (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    def approx_params(self) -> int:
        """The GPT-3 paper's count: ``12 L h^2 + (V + S) h`` (no biases or norms; f = 4h)."""
        return (
            12 * self.num_layers * self.hidden_size**2
            + (self.vocab_size + self.seq_length) * self.hidden_size
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: a shipped corpus (``corpus``) or existing megatron prefixes.

    Attributes:
        corpus: ``shakespeare`` | ``kjv`` (prepared with :func:`~lrscale_megatron.data.prepare_corpus`);
            ``null`` when ``train_prefix``/``valid_prefix`` are given.
        tokenizer: ``byte`` (258 ids) or ``bpe`` (trained on the training split, cached).
        tokenizer_vocab_size: BPE size including 2 specials (``bpe`` only); must be <= ``model.vocab_size``.
        shift: distribution-shift corpus, ``auto`` (the other shipped corpus) or ``null``.
        data_dir: where prepared files go (default: the package cache).
        max_documents: keep the first N documents per split (tests).
        train_prefix, valid_prefix, shift_prefix: megatron ``.bin/.idx`` prefixes (instead of ``corpus``).
        eod: end-of-document id for prefixes (GPT-2 BPE: 50256).
        seed: megatron's dataset shuffle seed.
    """

    corpus: str | None = "shakespeare"
    tokenizer: str = "byte"
    tokenizer_vocab_size: int = 8192
    shift: str | None = "auto"
    data_dir: str | None = None
    max_documents: int | None = None
    train_prefix: str | None = None
    valid_prefix: str | None = None
    shift_prefix: str | None = None
    eod: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.corpus is None and (self.train_prefix is None or self.valid_prefix is None):
            raise ConfigError(
                "data.corpus",
                None,
                "no data: neither a corpus nor train/valid prefixes",
                "set data.corpus ('shakespeare') or data.train_prefix and data.valid_prefix",
            )
        if self.corpus is not None and self.train_prefix is not None:
            raise ConfigError(
                "data.train_prefix",
                self.train_prefix,
                f"given together with corpus={self.corpus!r}",
                "keep one of data.corpus and data.train_prefix",
            )
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError("data.tokenizer", self.tokenizer, "unknown tokenizer", "use 'byte' or 'bpe'")
        if self.train_prefix is not None and self.eod is None:
            raise ConfigError(
                "data.eod",
                None,
                "is required with data.train_prefix",
                "give the tokenizer's end-of-document id (GPT-2 BPE: 50256)",
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Layout: ``tp * pp * dp == world_size``.

    Attributes:
        tp, pp: tensor- and pipeline-parallel sizes.
        dp: data-parallel size; ``null`` derives it from the launched world size.
        world_size: processes the config is sized for (``null``: whatever is launched); ``--dry-run``
            checks the layout against it.
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        _positive_int("parallel.tp", self.tp, "use 1 for no tensor parallelism")
        _positive_int("parallel.pp", self.pp, "use 1 for no pipeline parallelism")
        if self.dp is not None:
            _positive_int("parallel.dp", self.dp, "use null to derive it from the world size")
        if self.world_size is not None:
            _positive_int("parallel.world_size", self.world_size, "use null for 'as launched'")
            self.resolve_dp(self.world_size)

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` processes (error lists every factor)."""
        mp = self.tp * self.pp
        dp = self.dp if self.dp is not None else world_size // mp
        if dp < 1 or mp * dp != world_size:
            raise ConfigError(
                "parallel",
                {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": world_size},
                f"tp({self.tp}) * pp({self.pp}) * dp({dp}) = {mp * dp} != world_size({world_size})",
                f"launch a multiple of tp*pp = {mp} processes, or change parallel.tp/pp/dp",
            )
        return dp


@dataclass(frozen=True)
class TrainingConfig:
    """The loop.

    Attributes:
        steps: optimizer iterations of the whole run (the schedule's ``total_steps``).
        global_batch_size: sequences per iteration over all data-parallel ranks.
        micro_batch_size: sequences per forward pass on one rank.
        lr: peak LR (fills ``"auto"`` in the DeepSpeed JSON); ``lr_source`` says where it comes from.
        warmup_steps: iterations of linear warmup (fills ``"auto"``).
        dtype: parameter dtype without DeepSpeed mixed precision (``float64`` for exactness tests).
        seed: weights (``model.init = global_name``) and RNG.
        eval_every: iterations between validation losses (0: only at the end).
        eval_batches: global batches per validation / shift-corpus evaluation.
        log_every: iterations between log lines.
        output_dir: metrics CSV / TensorBoard directory (``null``: none written).
        peak_flops_per_device: hardware peak FLOP/s for MFU (H100 SXM bf16 dense: 989e12); ``null``: no MFU.
    """

    steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float | None = None
    lr_source: str | None = None
    warmup_steps: int = 0
    dtype: str = "float32"
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 1
    log_every: int = 1
    output_dir: str | None = None
    peak_flops_per_device: float | None = None

    def __post_init__(self) -> None:
        _positive_int("training.steps", self.steps, "give the number of optimizer iterations")
        _positive_int("training.global_batch_size", self.global_batch_size, "give sequences per iteration")
        _positive_int("training.micro_batch_size", self.micro_batch_size, "give sequences per forward pass")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "training.global_batch_size",
                self.global_batch_size,
                f"is not a multiple of micro_batch_size({self.micro_batch_size})",
                "make global_batch_size = micro_batch_size x accumulation x dp",
            )
        if self.lr is not None and not (
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0
        ):
            raise ConfigError("training.lr", self.lr, "must be a finite number > 0", "use e.g. 6e-4")
        _nonneg_int("training.warmup_steps", self.warmup_steps, "use 0 for no warmup")
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                "training.warmup_steps",
                self.warmup_steps,
                f"must be < steps({self.steps})",
                "shorten the warmup",
            )
        if self.dtype not in DTYPES:
            raise ConfigError("training.dtype", self.dtype, "unknown dtype", f"use one of {DTYPES}")
        for f in ("eval_every", "seed"):
            _nonneg_int(f"training.{f}", getattr(self, f), "give an integer >= 0")
        for f in ("eval_batches", "log_every"):
            _positive_int(f"training.{f}", getattr(self, f), "give a positive integer")
        if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
            raise ConfigError(
                "training.peak_flops_per_device",
                self.peak_flops_per_device,
                "must be > 0",
                "give FLOP/s (e.g. 989e12) or null",
            )

    @property
    def dtype_torch(self):
        import torch

        return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[self.dtype]


@dataclass(frozen=True)
class CheckpointConfig:
    """Attributes:
    dir: where checkpoints go (``<dir>/step<N>/``); ``null``: never saved.
    save_every: iterations between saves (0: only at the end when ``dir`` is set).
    load: a checkpoint directory (``<dir>/step<N>``) or a ``dir`` holding a ``latest`` file to resume
        from; ``null``: fresh start.
    """

    dir: str | None = None
    save_every: int = 0
    load: str | None = None

    def __post_init__(self) -> None:
        _nonneg_int("checkpoint.save_every", self.save_every, "use 0 to save only at the end")


@dataclass(frozen=True)
class TrainConfig:
    """The whole job. ``deepspeed`` is the DeepSpeed JSON (already loaded, ``"auto"`` not yet filled)."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    deepspeed: dict[str, Any]
    source: str = "<dict>"

    def __post_init__(self) -> None:
        m, p, t = self.model, self.parallel, self.training
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
        if (
            self.data.corpus is not None
            and self.data.tokenizer == "bpe"
            and self.data.tokenizer_vocab_size > m.vocab_size
        ):
            raise ConfigError(
                "data.tokenizer_vocab_size",
                self.data.tokenizer_vocab_size,
                f"exceeds model.vocab_size({m.vocab_size})",
                "raise model.vocab_size or shrink the BPE",
            )
        if self.data.corpus is not None and self.data.tokenizer == "byte" and m.vocab_size < 258:
            raise ConfigError(
                "model.vocab_size",
                m.vocab_size,
                "is below the byte tokenizer's 258 ids",
                "use vocab_size >= 258 (e.g. 264)",
            )
        if p.world_size is not None:
            self.check_batch(p.resolve_dp(p.world_size))
        if not isinstance(self.deepspeed, dict):
            raise ConfigError(
                "deepspeed", self.deepspeed, "must be a mapping or a JSON path", "see configs/deepspeed/"
            )
        if self.pipeline and int(self.deepspeed.get("zero_optimization", {}).get("stage", 0)) != 0:
            raise ConfigError(
                "deepspeed.zero_optimization.stage",
                self.deepspeed["zero_optimization"]["stage"],
                f"must be 0 with parallel.pp={p.pp} (the loop runs megatron's pipeline schedule "
                "and steps the engine's optimizer itself)",
                "use stage 0, or pp=1 for ZeRO 1/2",
            )
        if self.pipeline and (
            self.deepspeed.get("bf16", {}).get("enabled") or self.deepspeed.get("fp16", {}).get("enabled")
        ):
            raise ConfigError(
                "deepspeed.bf16.enabled",
                True,
                f"is not supported with parallel.pp={p.pp}: DeepSpeed's mixed-precision optimizer takes "
                "gradients from its own hooks, before the loop's pipeline reductions",
                "use pp=1 with tp/ZeRO-1 for bf16, or float32 with pp>1",
            )
        stage = int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))
        if stage == 3:
            raise ConfigError(
                "deepspeed.zero_optimization.stage",
                3,
                "is not supported with megatron tensor-parallel modules here",
                "use stage 0, 1 or 2",
            )
        if t.lr is None and _has_auto(self.deepspeed, ("optimizer", "params", "lr")):
            raise ConfigError(
                "training.lr",
                None,
                "is needed: the DeepSpeed optimizer lr is 'auto'",
                "set training.lr (the baseline peak LR)",
            )

    @property
    def pipeline(self) -> bool:
        return self.parallel.pp > 1

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

    def to_dict(self) -> dict[str, Any]:
        d = {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("deepspeed", "source")
        }
        d["deepspeed"] = copy.deepcopy(self.deepspeed)
        return d


def _has_auto(d: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    cur: Any = d
    for k in path:
        if not isinstance(cur, Mapping) or k not in cur:
            return False
        cur = cur[k]
    return cur == "auto"


_SECTIONS: dict[str, Any] = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
}


def _typed(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, "must be a mapping", f'write "{where}": {{...}}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}.{key}", value, "unknown key", f"remove it; known keys: {', '.join(fields)}{hint}"
            )
        kw[key] = _coerce(f"{where}.{key}", value, str(fields[key].type))
    missing = [
        n
        for n, f in fields.items()
        if n not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(where, dict(raw), f"missing required keys {missing}", f"add {missing}")
    return cls(**kw)


def _coerce(where: str, value: Any, annotation: str) -> Any:
    a = annotation.replace(" ", "")
    if value is None:
        if "None" in a:
            return None
        raise ConfigError(where, value, "must not be null", "give a value")
    base = a.split("|")[0]
    if base == "int" and isinstance(value, float) and value.is_integer():
        raise ConfigError(where, value, "is a float, expected an integer", f"write {int(value)}")
    checks = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }
    if base in checks and not checks[base]:
        hint = (
            " (write the number without quotes)"
            if isinstance(value, str) and base in ("int", "float")
            else ""
        )
        raise ConfigError(
            where, value, f"has type {type(value).__name__}, expected {base}", f"give a {base}{hint}"
        )
    return float(value) if base == "float" else value


def config_from_dict(
    raw: Mapping[str, Any], base_dir: str | Path | None = None, source: str = "<dict>"
) -> TrainConfig:
    """Validate a raw mapping (the JSON file's content, overrides applied)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<config>", raw, "must be a JSON object", 'write {"model": ..., "training": ...}')
    known = set(_SECTIONS) | {"deepspeed"}
    for key in raw:
        if not key.startswith("_") and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(
                key,
                raw[key],
                "unknown section",
                f"use {sorted(known)}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            )
    for key in ("model", "training"):
        if key not in raw:
            raise ConfigError(key, None, "section is missing", f'add "{key}": {{...}}')
    parts = {name: _typed(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    ds = raw.get("deepspeed", {})
    if isinstance(ds, str):
        ds = load_deepspeed_json(ds, base_dir)
    return TrainConfig(**parts, deepspeed=copy.deepcopy(dict(ds)), source=source)


def load_deepspeed_json(path: str, base_dir: str | Path | None = None) -> dict[str, Any]:
    p = Path(path)
    candidates = [p] if p.is_absolute() else [Path(base_dir or ".") / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return _strip_comments(json.loads(c.read_text()))
    raise ConfigError(
        "deepspeed",
        path,
        f"file not found (looked at {[str(c) for c in candidates]})",
        "give a path relative to the config file, or inline the DeepSpeed JSON",
    )


def _strip_comments(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_comments(v) for k, v in d.items() if not k.startswith("_")}
    return d


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` (value parsed as JSON, else kept as a string) into a copy of ``raw``.

    ``deepspeed.*`` keys reach into the DeepSpeed JSON (loaded first when it is a path).
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                "--override", item, "is not key=value", "write e.g. --override training.steps=20"
            )
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parts = key.strip().split(".")
        cur = out
        for i, k in enumerate(parts[:-1]):
            if k not in cur or cur[k] is None:
                cur[k] = {}
            if not isinstance(cur[k], dict):
                raise ConfigError(".".join(parts[: i + 1]), cur[k], "is not a section", f"cannot set {key}")
            cur = cur[k]
        cur[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON config, apply ``overrides`` (``key=value``), validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            "config", str(path), "file not found", "give the path of a JSON config (configs/gpt/*.json)"
        )
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("config", str(path), f"is not valid JSON ({e})", "fix the JSON syntax") from None
    if overrides:
        if isinstance(raw.get("deepspeed"), str) and any(o.startswith("deepspeed.") for o in overrides):
            raw["deepspeed"] = load_deepspeed_json(raw["deepspeed"], p.parent)
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, base_dir=p.parent, source=str(p))
