"""``model.arch``: the architectures the trainer builds besides megatron's GPT, and what each needs.

The same loop trains all of them (:func:`lrscale_megatron.train.train`): the same DeepSpeed engine
(optimizer, clipping, the ``LRScale`` scheduler from the DeepSpeed JSON), the same batch format, the same
loss function (:func:`~lrscale_megatron.models.gpt.gpt_loss_fn`: every model here takes megatron's
``GPTModel`` call signature), so ``lrscale sweep`` / ``lrscale tune`` ladders and the curvature
operators work on them unchanged. This module maps a :class:`~lrscale_megatron.train.sections.ModelConfig`
to the model, its parameter counts, its data, and refuses what an architecture cannot do.

=========  ==========================================  =============================================
arch       model                                       data
=========  ==========================================  =============================================
``gpt``    megatron-core ``GPTModel`` (TP/PP)          ``data.corpus`` text (megatron GPTDataset)
``mixer``  :class:`~.mixer.CausalMixer` (plain torch)   same as GPT (next-token bytes / BPE)
``vit``    :class:`~.vit.ViT` (plain torch)             ``data.corpus: "digits"`` (sklearn, offline)
=========  ==========================================  =============================================

For the ViT, ``hidden_size``, ``num_layers``, ``num_heads`` and ``ffn_hidden_size`` are its shape;
``seq_length`` must be 64 (the 8x8 pixels) and ``vocab_size`` 10 (the classes); the image is
upsampled to 16x16 and cut in 4x4 patches (:data:`VIT_IMAGE_SIZE`, :data:`VIT_PATCH_SIZE`).
"""

from __future__ import annotations

from typing import Any

import torch

from lrscale_megatron.configs.base import ConfigError
from lrscale_megatron.models.mixer import CausalMixer, MixerConfig, mixer_num_params
from lrscale_megatron.models.vit import ViT, ViTConfig, vit_num_params

VIT_IMAGE_SIZE = 16
VIT_PATCH_SIZE = 4
DIGITS_CORPUS = "digits"


def mixer_config(m: Any) -> MixerConfig:
    """The :class:`MixerConfig` of a ``model`` section."""
    return MixerConfig(
        vocab_size=m.vocab_size,
        seq_length=m.seq_length,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        ffn_hidden_size=m.ffn_hidden_size,
        tie_embeddings=m.tie_embeddings,
    )


def vit_config(m: Any) -> ViTConfig:
    """The :class:`ViTConfig` of a ``model`` section."""
    return ViTConfig(
        num_classes=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        image_size=VIT_IMAGE_SIZE,
        patch_size=VIT_PATCH_SIZE,
        ffn_hidden_size=m.ffn_hidden_size,
    )


def arch_num_params(m: Any) -> tuple[int, int]:
    """``(total, non_embedding)`` parameters of a non-GPT ``model`` section."""
    if m.arch == "mixer":
        return mixer_num_params(mixer_config(m))
    if m.arch == "vit":
        return vit_num_params(vit_config(m))
    raise ValueError(f"model.arch={m.arch!r} has no plain-PyTorch count; fix: use ModelConfig.num_params")


def check_arch(cfg: Any) -> None:
    """Cross-section rules of a non-GPT ``TrainConfig`` (called from its validator)."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if p.tp != 1 or p.pp != 1:
        raise ConfigError(
            "parallel",
            {"tp": p.tp, "pp": p.pp},
            f"model.arch={m.arch!r} is a plain-PyTorch model: no tensor or pipeline parallelism",
            "use parallel.tp=1 and parallel.pp=1 (data parallelism and ZeRO 1/2 work)",
        )
    if m.arch == "vit":
        if d.corpus != DIGITS_CORPUS:
            raise ConfigError(
                "data.corpus",
                d.corpus,
                "model.arch='vit' trains on scikit-learn's bundled 8x8 digits",
                f"set data.corpus to {DIGITS_CORPUS!r}",
            )
        if m.seq_length != 64:
            raise ConfigError(
                "model.seq_length",
                m.seq_length,
                "model.arch='vit' reads the 64 pixels of an 8x8 digit",
                "set model.seq_length to 64",
            )
        if m.vocab_size != 10:
            raise ConfigError(
                "model.vocab_size",
                m.vocab_size,
                "is the ViT's number of classes; the digits have 10",
                "set model.vocab_size to 10",
            )
    elif d.corpus == DIGITS_CORPUS:
        raise ConfigError(
            "data.corpus",
            d.corpus,
            f"is image data; model.arch={m.arch!r} is a language model",
            "use model.arch='vit' for the digits, or a text corpus ('shakespeare', 'kjv')",
        )


def build_arch_model(cfg: Any) -> torch.nn.Module:
    """The (unsharded, plain-PyTorch) model of a non-GPT ``TrainConfig``, initialised from its seed."""
    m, t = cfg.model, cfg.training
    model: Any
    if m.arch == "mixer":
        model = CausalMixer(mixer_config(m))
    elif m.arch == "vit":
        model = ViT(vit_config(m))
    else:
        raise ValueError(f"model.arch={m.arch!r}; fix: build GPT models with setup.build_model")
    model.init_weights(t.seed)
    model = model.to(t.dtype_torch)
    return model.cuda() if torch.cuda.is_available() else model


def build_arch_data(cfg: Any) -> Any:
    """:class:`~lrscale_megatron.train.setup.Data` of a ViT config (the digits; no shift corpus)."""
    from lrscale_megatron.data.digits import NUM_CLASSES, digits_splits
    from lrscale_megatron.train.setup import Data

    splits = digits_splits(seed=cfg.data.seed)
    return Data(train=splits.train, valid=splits.valid, shift=None, vocab_size=NUM_CLASSES)
