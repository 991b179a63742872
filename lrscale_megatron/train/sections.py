"""The five sections of a pretraining config (``model``, ``data``, ``parallel``, ``training``,
``checkpoint``): pydantic models on :class:`~lrscale_megatron.configs.ConfigModel`, one per section.

Each section checks its own fields; rules that span sections (``pp`` divides ``num_layers``, the batch
splits over ``dp``, ...) live in :class:`~lrscale_megatron.train.config.TrainConfig`. Integer lower bounds
are declared once per field (:func:`at_least`): the JSON schema shows them as ``minimum`` and
:class:`Section` enforces them with the field's own fix.

Units: ``training.steps``, ``warmup_steps``, ``eval_every``, ``save_every`` count optimizer iterations;
``global_batch_size`` and ``micro_batch_size`` count sequences.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lrscale_megatron.configs.base import ConfigError, ConfigModel, did_you_mean

DTYPES = ("float32", "float64", "bfloat16")


def at_least(lo: int, fix: str, default: Any = ...) -> Any:
    """A field holding an integer ``>= lo`` (``...``: required); ``fix`` is the error's fix."""
    return Field(default, json_schema_extra={"minimum": lo, "fix": fix})


def one_of(field: str, value: Any, choices: tuple[str, ...], what: str) -> Any:
    """``value`` if it is one of ``choices``, else an error naming them (for ``mode="before"`` checks)."""
    if isinstance(value, str) and value not in choices:
        raise ConfigError(
            field,
            value,
            f"unknown {what}",
            f"use one of {', '.join(map(repr, choices))}{did_you_mean(value, choices)}",
        )
    return value


class Section(ConfigModel):
    """A config section: enforces the ``minimum`` its fields declare with :func:`at_least`."""

    @field_validator("*")
    @classmethod
    def _minimum(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        extra = cls.model_fields[name].json_schema_extra if name in cls.model_fields else None
        lo = extra.get("minimum") if isinstance(extra, dict) else None
        if isinstance(lo, int) and isinstance(v, int) and v < lo:
            problem = "must be a positive integer" if lo == 1 else f"must be an integer >= {lo}"
            raise ConfigError(name, v, problem, str(extra.get("fix", f"give an integer >= {lo}")))  # type: ignore[union-attr]
        return v


ARCHS = ("gpt", "mixer", "vit")


class ModelConfig(Section):
    """GPT shape (megatron-core ``GPTModel``, learned absolute positions, pre-LayerNorm, GeLU MLP), or
    with ``arch`` another architecture trained by the same loop (:mod:`lrscale_megatron.models.arch`)."""

    name: str
    """Label used in logs and output paths."""
    arch: Literal["gpt", "mixer", "vit"] = "gpt"
    """``gpt`` (megatron-core GPTModel), ``mixer`` (causal MLP-Mixer LM, plain PyTorch: ``num_heads``
    unused) or ``vit`` (ViT on scikit-learn's bundled 8x8 digits: ``data.corpus`` ``digits``,
    ``seq_length`` 64 pixels, ``vocab_size`` 10 classes). Non-GPT architectures need tp = pp = 1."""
    vocab_size: int = at_least(1, "give a positive integer")
    """Embedding rows; pad it to a multiple of 128 x tp (50257 -> 50304 for GPT-2 BPE)."""
    seq_length: int = at_least(1, "give a positive integer")
    """Tokens per sample."""
    hidden_size: int = at_least(1, "give a positive integer")
    """Transformer width."""
    num_layers: int = at_least(1, "give a positive integer")
    """Transformer layers."""
    num_heads: int = at_least(1, "give a positive integer")
    """Attention heads (must divide hidden_size)."""
    ffn_hidden_size: int = at_least(0, "use 0 for 4 x hidden_size", default=0)
    """MLP width; 0 means 4 x hidden_size."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer (GPT-2/3 do)."""
    init: Literal["global_name", "megatron"] = "global_name"
    """``global_name``: every parameter drawn from ``(seed, global name)`` at full shape, so any TP x PP
    layout starts from the same weights (CPU/small models); ``megatron``: megatron's own init on the
    device (large models)."""
    transformer_impl: Literal["local", "transformer_engine", "auto"] = "local"
    """``local`` (megatron local spec), ``transformer_engine`` (TE spec; an error without CUDA and
    ``transformer_engine``) or ``auto`` (TE when both are present, else local)."""

    @field_validator("init", mode="before")
    @classmethod
    def _init(cls, v: Any) -> Any:
        return one_of("init", v, ("global_name", "megatron"), "init")

    @field_validator("arch", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        return one_of("arch", v, ARCHS, "architecture")

    @field_validator("transformer_impl", mode="before")
    @classmethod
    def _impl(cls, v: Any) -> Any:
        return one_of("transformer_impl", v, ("local", "transformer_engine", "auto"), "implementation")

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "num_heads",
                self.num_heads,
                f"does not divide hidden_size({self.hidden_size})",
                "pick a head count that divides hidden_size",
            )
        return self

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def num_params(self) -> int:
        """Exact parameter count of the megatron local-spec GPTModel (tied embedding counted once):
        ``L * (4h^2 + 2hf + 9h + f) + (V + S) * h + 2h`` (+ ``V * h`` untied), ``f`` the MLP width."""
        if self.arch != "gpt":  # the architecture's own count (lrscale_megatron.models.arch)
            from lrscale_megatron.models.arch import arch_num_params

            return arch_num_params(self)[0]
        h, f, L = self.hidden_size, self.ffn, self.num_layers
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        out = 0 if self.tie_embeddings else self.vocab_size * h
        return L * per_layer + (self.vocab_size + self.seq_length) * h + 2 * h + out

    def num_non_embedding_params(self) -> int:
        """Parameters outside the word and position embeddings (what the LR laws are fitted on)."""
        if self.arch != "gpt":
            from lrscale_megatron.models.arch import arch_num_params

            return arch_num_params(self)[1]
        emb = (self.vocab_size + self.seq_length) * self.hidden_size
        return self.num_params() - emb - (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    def approx_params(self) -> int:
        """The GPT-3 paper's count: ``12 L h^2 + (V + S) h`` (no biases or norms; f = 4h)."""
        return (
            12 * self.num_layers * self.hidden_size**2
            + (self.vocab_size + self.seq_length) * self.hidden_size
        )


class DataConfig(Section):
    """Where the tokens come from: a shipped corpus (``corpus``) or existing megatron prefixes."""

    corpus: str | None = "shakespeare"
    """``shakespeare`` | ``kjv`` (prepared with :func:`~lrscale_megatron.data.prepare_corpus`); ``null``
    when ``train_prefix``/``valid_prefix`` are given."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """``byte`` (258 ids) or ``bpe`` (trained on the training split, cached)."""
    tokenizer_vocab_size: int = at_least(258, "use at least 258 (256 bytes + 2 specials)", default=8192)
    """BPE size including 2 specials (``bpe`` only); must be <= ``model.vocab_size``."""
    shift: str | None = "auto"
    """Distribution-shift corpus: ``auto`` (the other shipped corpus) or ``null``."""
    data_dir: str | None = None
    """Where prepared files go (default: the package cache)."""
    max_documents: int | None = at_least(1, "give a positive integer or null for all", default=None)
    """Keep the first N documents per split (tests)."""
    train_prefix: str | None = None
    """Megatron ``.bin/.idx`` prefix of the training data (instead of ``corpus``)."""
    valid_prefix: str | None = None
    """Megatron prefix of the validation data."""
    shift_prefix: str | None = None
    """Megatron prefix of the distribution-shift data."""
    eod: int | None = at_least(0, "give the tokenizer's end-of-document id (GPT-2 BPE: 50256)", default=None)
    """End-of-document id for prefixes (GPT-2 BPE: 50256)."""
    seed: int = at_least(0, "give an integer >= 0", default=1234)
    """Megatron's dataset shuffle seed."""
    lambada_passages: int | None = at_least(0, "give a count, 0 (off) or null (auto)", default=None)
    """LAMBADA-style last-word passages scored at the end of the run (:mod:`lrscale_megatron.data.lambada`);
    ``null``: 64 where they can be scored (a shipped ``corpus``, ``parallel.pp == 1``), else off; 0: off."""
    lambada_source: Literal["valid", "shift"] = "valid"
    """Where the passages come from: the held-out works of ``corpus`` or the whole ``shift`` corpus."""

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer(cls, v: Any) -> Any:
        return one_of("tokenizer", v, ("byte", "bpe"), "tokenizer")

    @field_validator("lambada_source", mode="before")
    @classmethod
    def _lambada_source(cls, v: Any) -> Any:
        return one_of("lambada_source", v, ("valid", "shift"), "passage source")

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if self.corpus is None and (self.train_prefix is None or self.valid_prefix is None):
            raise ConfigError(
                "corpus",
                None,
                "no data: neither a corpus nor train/valid prefixes",
                "set data.corpus ('shakespeare') or data.train_prefix and data.valid_prefix",
            )
        if self.corpus is not None and self.train_prefix is not None:
            raise ConfigError(
                "train_prefix",
                self.train_prefix,
                f"given together with corpus={self.corpus!r}",
                "keep one of data.corpus and data.train_prefix",
            )
        if self.train_prefix is not None and self.eod is None:
            raise ConfigError(
                "eod",
                None,
                "is required with data.train_prefix",
                "give the tokenizer's end-of-document id (GPT-2 BPE: 50256)",
            )
        return self


class ParallelConfig(Section):
    """Layout: ``tp * pp * dp == world_size``."""

    tp: int = at_least(1, "use 1 for no tensor parallelism", default=1)
    """Tensor-parallel size."""
    pp: int = at_least(1, "use 1 for no pipeline parallelism", default=1)
    """Pipeline-parallel size."""
    dp: int | None = at_least(1, "use null to derive it from the world size", default=None)
    """Data-parallel size; ``null`` derives it from the launched world size."""
    world_size: int | None = at_least(1, "use null for 'as launched'", default=None)
    """Processes the config is sized for (``null``: whatever is launched); ``--dry-run`` checks the
    layout against it."""

    @model_validator(mode="after")
    def _layout(self) -> ParallelConfig:
        if self.world_size is not None:
            self.resolve_dp(self.world_size)
        return self

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


class TrainingConfig(Section):
    """The loop."""

    steps: int = at_least(1, "give the number of optimizer iterations")
    """Optimizer iterations of the whole run (the schedule's ``total_steps``)."""
    global_batch_size: int = at_least(1, "give sequences per iteration")
    """Sequences per iteration over all data-parallel ranks."""
    micro_batch_size: int = at_least(1, "give sequences per forward pass")
    """Sequences per forward pass on one rank."""
    lr: float | None = Field(None, json_schema_extra={"exclusiveMinimum": 0, "fix": "use e.g. 6e-4"})
    """Peak LR (fills ``"auto"`` in the DeepSpeed JSON)."""
    lr_source: str | None = None
    """Where ``lr`` comes from (e.g. ``GPT-3 paper, Table 2.1``)."""
    warmup_steps: int = at_least(0, "use 0 for no warmup", default=0)
    """Iterations of linear warmup (fills ``"auto"``)."""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Parameter dtype without DeepSpeed mixed precision (``float64`` for exactness tests)."""
    seed: int = at_least(0, "give an integer >= 0", default=0)
    """Weights (``model.init = global_name``) and RNG."""
    eval_every: int = at_least(0, "give an integer >= 0 (0: only at the end)", default=0)
    """Iterations between validation losses (0: only at the end)."""
    eval_batches: int = at_least(1, "give a positive integer", default=1)
    """Global batches per validation / shift-corpus evaluation."""
    log_every: int = at_least(1, "give a positive integer", default=1)
    """Iterations between log lines."""
    output_dir: str | None = None
    """Metrics CSV / TensorBoard directory (``null``: none written)."""
    peak_flops_per_device: float | None = Field(
        None, json_schema_extra={"exclusiveMinimum": 0, "fix": "give FLOP/s (e.g. 989e12) or null"}
    )
    """Hardware peak FLOP/s for MFU (H100 SXM bf16 dense: 989e12); ``null``: no MFU."""

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        return one_of("dtype", v, DTYPES, "dtype")

    @field_validator("lr", "peak_flops_per_device")
    @classmethod
    def _positive(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            fix = "use e.g. 6e-4" if info.field_name == "lr" else "give FLOP/s (e.g. 989e12) or null"
            raise ConfigError(str(info.field_name), v, "must be a finite number > 0", fix)
        return v

    @model_validator(mode="after")
    def _batch_and_warmup(self) -> TrainingConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "global_batch_size",
                self.global_batch_size,
                f"is not a multiple of micro_batch_size({self.micro_batch_size})",
                "make global_batch_size = micro_batch_size x accumulation x dp",
            )
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                "warmup_steps", self.warmup_steps, f"must be < steps({self.steps})", "shorten the warmup"
            )
        return self

    @property
    def dtype_torch(self) -> Any:
        import torch

        return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[self.dtype]


class CheckpointConfig(Section):
    """Where checkpoints go and where a run resumes from."""

    dir: str | None = None
    """Where checkpoints go (``<dir>/step<N>/``); ``null``: never saved."""
    save_every: int = at_least(0, "use 0 to save only at the end", default=0)
    """Iterations between saves (0: only at the end when ``dir`` is set)."""
    load: str | None = None
    """A checkpoint directory (``<dir>/step<N>``) or a ``dir`` holding a ``latest`` file to resume from;
    ``null``: fresh start."""
