"""Model, data and DeepSpeed engine for one training run (everything :func:`~.loop.train` builds).

The DeepSpeed engine owns the optimizer, the ZeRO stage and the LR scheduler in every layout:

* ``pp == 1``: the engine runs the step too (``engine(...)``, ``engine.backward``, ``engine.step``), so
  DeepSpeed does the data-parallel reduction (or ZeRO 1/2 reduce-scatter), gradient clipping (its norm
  counts megatron's ``tensor_model_parallel`` shards once per TP group) and the scheduler step.
* ``pp > 1``: DeepSpeed's engine cannot drive megatron's pipeline schedule, so forward/backward run
  through ``megatron.core.pipeline_parallel.get_forward_backward_func`` (1F1B); the loop then sums the
  tied-embedding gradient over the embedding group, averages gradients over data-parallel replicas,
  clips with a TP/PP-aware norm, and calls ``engine.step()`` with ZeRO stage 0 and one accumulation step,
  which applies the optimizer and steps the scheduler. ``gradient_clipping`` (DeepSpeed's default 1.0
  when absent) is therefore applied by the loop and set to 0 in the engine's config in that layout
  (DeepSpeed's norm counts TP-replicated tensors on model-parallel rank 0 only, i.e. not on later stages).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lrscale_megatron.parallel import ParallelContext
from lrscale_megatron.train.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- model
def preset_of(cfg: TrainConfig):
    from lrscale_megatron.models.gpt import GPTPreset

    m = cfg.model
    return GPTPreset(
        m.name,
        vocab_size=m.vocab_size,
        seq_length=m.seq_length,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        micro_batch_size=cfg.training.micro_batch_size,
        ffn_hidden_size=m.ffn_hidden_size,
        tie_embeddings=m.tie_embeddings,
    )


def build_model(cfg: TrainConfig, ctx: ParallelContext) -> torch.nn.Module:
    """This rank's TP/PP part of the megatron-core GPTModel (parallel_state must be initialised), or the
    plain-PyTorch model of another ``model.arch`` (:mod:`lrscale_megatron.models.arch`)."""
    from lrscale_megatron.models.gpt import build_gpt

    if cfg.model.arch != "gpt":
        from lrscale_megatron.models.arch import build_arch_model

        torch.manual_seed(cfg.training.seed)
        return build_arch_model(cfg)

    preset, dtype, seed = preset_of(cfg), cfg.training.dtype_torch, cfg.training.seed
    torch.manual_seed(seed)
    on_gpu = torch.cuda.is_available()
    spec = None
    if resolve_impl(cfg.model.transformer_impl) == "transformer_engine":
        spec = _transformer_engine_spec()
    overrides: dict[str, Any] = {}
    if on_gpu:  # megatron's own on-device init path; bf16 compute
        overrides = {"use_cpu_initialization": False, "bf16": dtype == torch.bfloat16}
    model = build_gpt(preset, ctx, dtype=dtype, seed=seed, layer_spec=spec, init=cfg.model.init, **overrides)
    return model.cuda() if on_gpu else model


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``transformer_engine`` when CUDA and ``transformer_engine`` are present, else ``local``."""
    if impl != "auto":
        return impl
    if not torch.cuda.is_available():
        return "local"
    import importlib.util

    return "transformer_engine" if importlib.util.find_spec("transformer_engine") is not None else "local"


def _transformer_engine_spec() -> Any:
    """megatron's Transformer Engine layer spec (GPU path; not exercised on CPU)."""
    if not torch.cuda.is_available():
        raise ConfigError("model.transformer_impl", "transformer_engine", "needs CUDA", "use 'local' on CPU")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.transformer_impl",
            "transformer_engine",
            "transformer_engine is not importable",
            "install Transformer Engine or use 'local'",
        ) from None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two optimizer groups: weight matrices decay, biases and norms (1-D) do not (GPT-2/3, Megatron)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """megatron ``GPTDataset``s of the run (``shift`` ``None`` without a shift corpus)."""

    train: Any
    valid: Any
    shift: Any
    vocab_size: int
    lambada: list[Any] | None = None
    """Encoded LAMBADA-style passages (:mod:`.downstream`), ``None`` when off."""
    lambada_source: str | None = None


def build_data(cfg: TrainConfig, ctx: ParallelContext) -> Data:
    """Prepare (rank 0 first, cached) and open the datasets on every rank (``model.arch='vit'``: the
    bundled digits, :func:`lrscale_megatron.models.arch.build_arch_data`)."""
    import torch.distributed as dist

    if cfg.model.arch == "vit":
        from lrscale_megatron.models.arch import build_arch_data

        return build_arch_data(cfg)

    from lrscale_megatron.data import VocabInfo, build_datasets, prepare_corpus

    d, t = cfg.data, cfg.training
    n_train = (t.steps + 1) * t.global_batch_size
    if d.corpus is not None:
        corpus: str = d.corpus

        def prepare():
            return prepare_corpus(
                corpus,
                vocab_size=d.tokenizer_vocab_size,
                out_dir=d.data_dir,
                seq_length=cfg.model.seq_length,
                tokenizer=d.tokenizer,
                shift=d.shift,
                max_documents=d.max_documents,
            )

        if dist.get_rank() == 0:
            prepared = prepare()
        dist.barrier()
        if dist.get_rank() != 0:
            prepared = prepare()
        tok: Any = prepared.tokenizer
        prefixes = (prepared.train_prefix, prepared.valid_prefix, prepared.shift_prefix)
    else:
        tok = VocabInfo(vocab_size=cfg.model.vocab_size, eod=int(d.eod or 0))
        prefixes = (d.train_prefix, d.valid_prefix, d.shift_prefix)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"is smaller than the tokenizer's {tok.vocab_size} ids",
            f"use >= {tok.vocab_size}",
        )
    sets = build_datasets(
        prefixes[0],
        prefixes[1],
        cfg.model.seq_length,
        num_train_samples=n_train,
        tokenizer=tok,
        seed=d.seed,
        prefix_shift=prefixes[2],
    )
    data = Data(train=sets.train, valid=sets.valid, shift=sets.shift, vocab_size=tok.vocab_size)
    if cfg.lambada_passages and d.corpus is not None:
        from lrscale_megatron.train.downstream import held_out_passages

        data.lambada, data.lambada_source = held_out_passages(
            prepared, d.lambada_source, cfg.lambada_passages, cfg.model.seq_length, d.tokenizer == "byte"
        )
    return data


def to_device(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch on the current CUDA device (unchanged on CPU)."""
    if not torch.cuda.is_available():
        return mb
    return {k: v.cuda(non_blocking=True) for k, v in mb.items()}


def micro_batches(batch: Any, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split one rank's :class:`~lrscale_megatron.data.Batch` into ``gpt_loss_fn`` dicts."""
    d = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    n = d["tokens"].shape[0] // micro_batch_size
    return [{k: v[i * micro_batch_size : (i + 1) * micro_batch_size] for k, v in d.items()} for i in range(n)]


# ----------------------------------------------------------------------------------------- engine
_AUTO_LR = ("peak_lr", "warmup_max_lr")
_AUTO_TOTAL = ("total_steps", "total_num_steps")
_AUTO_WARMUP = ("warmup_steps", "warmup_num_steps")


def deepspeed_config(cfg: TrainConfig, dp: int) -> tuple[dict[str, Any], float]:
    """The engine's config: ``"auto"`` filled from ``cfg``, batch keys derived, and for ``pp > 1``
    ``gradient_clipping`` moved out. Returns ``(config, clip_norm_done_by_the_loop)``."""
    t, m = cfg.training, cfg.model
    ds = copy.deepcopy(cfg.deepspeed)
    gas = cfg.check_batch(dp)
    if cfg.pipeline:  # megatron's schedule accumulates the micro-batches; one engine step per iteration
        batch = {
            "train_batch_size": t.global_batch_size,
            "train_micro_batch_size_per_gpu": t.global_batch_size // dp,
            "gradient_accumulation_steps": 1,
        }
    else:
        batch = {
            "train_batch_size": t.global_batch_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": gas,
        }
    for key, value in batch.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"deepspeed.{key}",
                given,
                f"disagrees with the training section ({value})",
                'remove it or write "auto"; batch sizes come from training.*',
            )
        ds[key] = value
    opt = ds.get("optimizer", {}).get("params", {})
    if opt.get("lr") == "auto":
        opt["lr"] = t.lr
    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        tokens_per_step = t.global_batch_size * m.seq_length
        for key, value in list(params.items()):
            if value != "auto":
                continue
            if key in _AUTO_LR:
                if t.lr is None:
                    raise ConfigError(
                        "training.lr",
                        None,
                        f"is needed for deepspeed.scheduler.params.{key}='auto'",
                        "set training.lr",
                    )
                params[key] = t.lr
            elif key in _AUTO_TOTAL:
                params[key] = t.steps
            elif key in _AUTO_WARMUP:
                params[key] = t.warmup_steps
            elif key == "model":
                params[key] = {
                    "params": float(m.num_non_embedding_params()),
                    "tokens": float(t.steps * tokens_per_step),
                    "batch_tokens": float(tokens_per_step),
                    "width": m.hidden_size,
                    "depth": m.num_layers,
                }
    _no_auto_left(ds, "deepspeed")
    ds.setdefault("steps_per_print", 10**9)
    clip = 0.0
    if cfg.pipeline:  # the loop clips; DeepSpeed would clip at its default 1.0 if the key were only removed
        from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

        clip = float(ds.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT) or 0.0)
        ds["gradient_clipping"] = 0.0
    if t.dtype == "bfloat16" and not ds.get("bf16", {}).get("enabled", False):
        raise ConfigError(
            "training.dtype",
            "bfloat16",
            "needs deepspeed bf16.enabled=true (fp32 master weights)",
            'add "bf16": {"enabled": true} to the DeepSpeed JSON, or use float32',
        )
    if ds.get("bf16", {}).get("enabled", False) and t.dtype != "bfloat16":
        raise ConfigError(
            "training.dtype",
            t.dtype,
            "disagrees with deepspeed bf16.enabled=true",
            'set training.dtype="bfloat16"',
        )
    if t.dtype == "float64" and dp > 1 and not cfg.pipeline:
        raise ConfigError(
            "training.dtype",
            "float64",
            f"with dp={dp} and pp=1: DeepSpeed's gradient all-reduce takes float32/bfloat16 only",
            "use float32, or dp=1 (float64 is for exactness tests)",
        )
    return ds, clip


def _no_auto_left(d: Any, where: str) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _no_auto_left(v, f"{where}.{k}")
    elif d == "auto":
        raise ConfigError(
            where,
            "auto",
            "cannot be derived from the training config",
            "give a value (only lr, warmup/total steps, batch sizes and LRScale model are 'auto')",
        )


def megatron_mpu() -> Any:
    """DeepSpeed's ``mpu`` over megatron ``parallel_state``.

    DeepSpeed's "model parallel" group is megatron's model-parallel (TP x PP) group, so checkpoint
    shards are named per (tp, pp) rank; with ``pp == 1`` it is the TP group, which is what DeepSpeed's
    gradient-norm reduction needs.
    """
    from megatron.core import parallel_state as ps

    def mp_rank() -> int:
        return (
            ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size()
            + ps.get_tensor_model_parallel_rank()
        )

    def mp_size() -> int:
        return ps.get_pipeline_model_parallel_world_size() * ps.get_tensor_model_parallel_world_size()

    return types.SimpleNamespace(
        get_model_parallel_rank=mp_rank,
        get_model_parallel_world_size=mp_size,
        get_model_parallel_group=ps.get_model_parallel_group,
        get_tensor_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_tensor_model_parallel_src_rank=ps.get_tensor_model_parallel_src_rank,
        get_pipeline_model_parallel_rank=ps.get_pipeline_model_parallel_rank,
        get_pipeline_model_parallel_world_size=ps.get_pipeline_model_parallel_world_size,
        get_pipeline_model_parallel_group=ps.get_pipeline_model_parallel_group,
        get_data_parallel_rank=ps.get_data_parallel_rank,
        get_data_parallel_world_size=ps.get_data_parallel_world_size,
        get_data_parallel_group=ps.get_data_parallel_group,
    )


#: Optimizers DeepSpeed cannot build from its JSON, by the ``"optimizer": {"type": NAME}`` that selects
#: them: ``factory(model, param_groups, params) -> torch.optim.Optimizer`` (``params`` = the JSON's
#: ``optimizer.params`` with ``"auto"`` filled). :func:`initialize_engine` builds the optimizer and passes it
#: to ``deepspeed.initialize(optimizer=...)`` (the JSON's block is dropped: a client optimizer wins).
CLIENT_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {}


def register_client_optimizer(name: str, factory: Callable[..., torch.optim.Optimizer]) -> None:
    """Make ``"optimizer": {"type": name}`` in a DeepSpeed JSON build ``factory``'s optimizer (idempotent)."""
    CLIENT_OPTIMIZERS[name] = factory


def initialize_engine(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` with the megatron mpu; ``"type": "LRScale"`` is registered first; an
    optimizer type in :data:`CLIENT_OPTIMIZERS` is built here and handed to DeepSpeed."""
    import deepspeed
    import deepspeed.ops

    from lrscale_megatron.integrations import deepspeed as lrs_ds

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35 s JIT build on CPU
    lrs_ds.register()
    groups = param_groups(model)
    client = None
    factory = CLIENT_OPTIMIZERS.get(str((ds_config.get("optimizer") or {}).get("type")))
    if factory is not None:
        client = factory(model, groups, dict(ds_config["optimizer"].get("params", {})))
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=client, config=ds_config, mpu=megatron_mpu()
    )
    return engine
