"""megatron-core GPTModel presets, built identically under any TP x PP layout.

:func:`build_gpt` builds this rank's stage/shard of a ``GPTModel`` (local layer spec on CPU, Transformer
Engine spec when requested and present) and initialises every parameter from a generator seeded by
its *global* name at its *full* shape, then slices this rank's shard. A TP x PP-sharded model therefore
holds exactly the shards of the unsharded model: the property the model-parallel curvature tests rest on.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lrscale_megatron.parallel import ParallelContext


@dataclass(frozen=True)
class GPTPreset:
    """Shape of a GPT. ``ffn_hidden_size`` 0 means 4·hidden."""

    name: str
    vocab_size: int
    seq_length: int
    hidden_size: int
    num_layers: int
    num_heads: int
    micro_batch_size: int
    ffn_hidden_size: int = 0
    tie_embeddings: bool = True

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def num_params(self) -> int:
        """Analytic parameter count (tied embeddings counted once), megatron local spec with biases."""
        h, f, L = self.hidden_size, self.ffn, self.num_layers
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        emb = self.vocab_size * h + self.seq_length * h
        out = 0 if self.tie_embeddings else self.vocab_size * h
        return L * per_layer + emb + 2 * h + out

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTPreset] = {
    # ~0.12M parameters: the curvature smoke test and the TP x PP equality tests.
    "tiny": GPTPreset(
        "tiny", vocab_size=256, seq_length=32, hidden_size=64, num_layers=2, num_heads=4, micro_batch_size=4
    ),
    # ~5.4M parameters: the CPU benchmark model (HVP cost ratios, online-adaptation overhead).
    "small": GPTPreset(
        "small",
        vocab_size=256,
        seq_length=128,
        hidden_size=384,
        num_layers=3,
        num_heads=6,
        micro_batch_size=8,
    ),
}


def get_preset(name: str) -> GPTPreset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def transformer_config(preset: GPTPreset, ctx: ParallelContext, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn,
        num_attention_heads=preset.num_heads,
        use_cpu_initialization=True,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_sync=torch.cuda.is_available(),  # gloo: the batched p2p sync path needs CUDA
    )


def build_gpt(
    preset: GPTPreset,
    ctx: ParallelContext,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    layer_spec: Any = None,
    init: str = "global_name",
    **config_overrides: Any,
):
    """This rank's part of a megatron-core GPTModel for ``preset`` (parallel_state must be initialised).

    ``layer_spec`` is a spec factory (default megatron's local spec; pass
    ``get_gpt_layer_with_transformer_engine_spec`` on GPU), ``config_overrides`` replace fields of
    :func:`transformer_config`, and ``init="global_name"`` re-initialises every parameter by global name
    (any layout starts from the same weights) while ``init="megatron"`` keeps megatron's own init.
    The model is returned on the CPU unless megatron built it on the device.
    """
    import contextlib
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if init not in ("global_name", "megatron"):
        raise ValueError(f"init={init!r} must be 'global_name' or 'megatron'")
    tcfg = transformer_config(preset, ctx, dtype)
    if config_overrides:
        tcfg = dataclasses.replace(tcfg, **config_overrides)
    cpu: contextlib.AbstractContextManager = contextlib.nullcontext()
    if not torch.cuda.is_available():  # tied-embedding setup under PP calls .cuda()
        from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode

        cpu = CudaToCpuMode()
    with cpu:
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=(layer_spec or get_gpt_layer_local_spec)(),
            vocab_size=preset.vocab_size,
            max_sequence_length=preset.seq_length,
            pre_process=ctx.is_first_stage,
            post_process=ctx.is_last_stage,
            share_embeddings_and_output_weights=preset.tie_embeddings,
            parallel_output=True,
        )
    model.to(dtype)  # megatron's WrappedTorchNorm ignores params_dtype
    if init == "global_name":
        init_by_global_name(model, ctx, preset.num_layers, seed)
    return model


def init_by_global_name(model: torch.nn.Module, ctx: ParallelContext, num_layers: int, seed: int) -> None:
    """GPT-2 initialisation, drawn per parameter from ``(seed, global name)`` at full shape, then sharded."""
    ctx = _with_offset(ctx, model)
    specs = ctx.param_specs(list(model.named_parameters()))
    with torch.no_grad():
        for (_name, p), spec in zip(model.named_parameters(), specs):
            gname = spec.name
            if gname.endswith("bias"):
                p.zero_()
                continue
            if "norm" in gname:
                p.fill_(1.0)
                continue
            std = (
                0.02 / math.sqrt(2 * num_layers)
                if gname.endswith(("linear_proj.weight", "linear_fc2.weight"))
                else 0.02
            )
            g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(gname.encode()))
            full = torch.randn(spec.full_shape, generator=g, dtype=torch.float64) * std
            p.copy_(spec.shard(full).to(p.dtype))


def _with_offset(ctx: ParallelContext, model: torch.nn.Module) -> ParallelContext:
    from lrscale_megatron.megatron_state import layer_offset

    if ctx.pp_size > 1 and ctx.layer_offset == 0:
        ctx.layer_offset = layer_offset(model)
    return ctx


def causal_mask(seq_length: int) -> torch.Tensor:
    """megatron's boolean attention mask (True = masked) of shape [1, 1, S, S]."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1).view(1, 1, seq_length, seq_length)


def gpt_loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Stage output of a megatron GPTModel on ``batch`` (tokens, labels, loss_mask, position_ids):
    the masked mean next-token loss on the last stage, the hidden states elsewhere."""
    m: Any = model
    while not hasattr(m, "post_process") and hasattr(m, "module"):
        m = m.module
    s = batch["tokens"].shape[1]
    if m.post_process:
        per_token = model(batch["tokens"], batch["position_ids"], causal_mask(s), labels=batch["labels"])
        mask = batch["loss_mask"].to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum()
    return model(batch["tokens"], batch["position_ids"], causal_mask(s))
