"""GPT samples from ``.bin/.idx`` prefixes through megatron-core, and deterministic global batches.

:func:`build_datasets` is megatron-core's own path (``BlendedMegatronDatasetBuilder(GPTDataset, ...)``):
documents are concatenated (each ends with the EOD token), shuffled by ``random_seed``, and cut into
samples of ``seq_length + 1`` tokens, so ``labels`` are ``tokens`` shifted left by one. The three
megatron splits carry our train prefix, the held-out validation prefix, and (in megatron's ``test``
slot) an optional distribution-shift prefix, each from its own files (``blend_per_split``).

:func:`get_batch` is a pure function of ``(dataset, step)``: global batch ``step`` is samples
``[step * G, (step + 1) * G)`` of the (already seed-shuffled) dataset, modulo its length, and data-parallel
rank ``r`` of ``W`` takes the ``r``-th contiguous ``G / W`` of it. Every rank therefore agrees on the
global batch without communication, and the ranks' slices are disjoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from lrscale_megatron.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTDatasets:
    """megatron-core ``GPTDataset``s; ``shift`` is ``None`` when no shift prefix was given."""

    train: GPTDataset
    valid: GPTDataset
    shift: GPTDataset | None


@dataclass(frozen=True)
class Batch:
    """One rank's micro-batch; every tensor is ``[batch, seq_length]``.

    Attributes:
        tokens: input ids (int64).
        labels: next-token targets (int64): ``labels[:, i] == tokens[:, i + 1]`` within a sample.
        loss_mask: 1.0 where the label counts toward the loss (float32).
        position_ids: ``0 .. seq_length - 1`` per row (int64).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor


def build_datasets(
    prefix_train: str | os.PathLike[str],
    prefix_valid: str | os.PathLike[str],
    seq_length: int,
    num_train_samples: int,
    tokenizer: Tokenizer,
    num_valid_samples: int | None = None,
    seed: int = 1234,
    prefix_shift: str | os.PathLike[str] | None = None,
    num_shift_samples: int | None = None,
    index_cache_dir: str | os.PathLike[str] | None = None,
) -> GPTDatasets:
    """Build megatron-core ``GPTDataset``s over existing ``.bin/.idx`` prefixes.

    Args:
        prefix_train, prefix_valid, prefix_shift: ``.bin/.idx`` path prefixes (without the suffix).
        seq_length: tokens per sample (megatron reads ``seq_length + 1`` and shifts for the labels).
        num_train_samples: samples (sequences, not steps) the training set must provide; megatron
            repeats the data in reshuffled epochs to reach it.
        tokenizer: supplies ``eod``/``pad``/``vocab_size`` and the cache key's ``unique_identifiers``.
        num_valid_samples, num_shift_samples: ``None`` for exactly one epoch of the held-out data.
        seed: megatron's ``random_seed`` for the document and sample shuffles.
        index_cache_dir: where megatron caches its index ``.npy`` files; default (megatron's)
            ``<prefix>/cache/GPTDataset_indices``, a directory named like the prefix. Pass one for
            read-only data directories.

    Must be called on every rank when ``torch.distributed`` is initialized (megatron builds on
    rank 0 first and the others wait at a barrier, then read its cached indices).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    if num_train_samples < 1:
        raise ValueError(f"num_train_samples={num_train_samples}: must be >= 1")
    blend_per_split: list[Any] = [
        ([str(prefix_train)], None),
        ([str(prefix_valid)], None),
        ([str(prefix_shift)], None) if prefix_shift is not None else None,
    ]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        path_to_cache=str(index_cache_dir) if index_cache_dir is not None else None,
        tokenizer=tokenizer,  # type: ignore[arg-type]  # duck-typed MegatronTokenizerBase
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # megatron-core models apply the causal mask themselves
    )
    sizes = [num_train_samples, num_valid_samples, num_shift_samples]
    train, valid, shift = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or valid is None:
        raise RuntimeError(f"megatron built no train or valid dataset from {prefix_train}, {prefix_valid}")
    for name, ds in (("train", train), ("valid", valid), ("shift", shift)):
        if ds is not None and len(ds) == 0:
            raise ValueError(f"the {name} dataset holds fewer than seq_length + 1 = {seq_length + 1} tokens")
    return GPTDatasets(train=train, valid=valid, shift=shift)


def get_batch(dataset: Any, step: int, global_batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
    """Rank ``rank``'s slice of global batch ``step`` (an iteration count, from 0).

    Args:
        dataset: anything indexable returning megatron's sample dicts (a ``GPTDataset``).
        global_batch_size: samples per step across all data-parallel ranks.
        rank, world_size: the data-parallel rank and size (not the global ones under TP/PP).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size({global_batch_size}) must be a positive multiple of world_size({world_size})"
        )
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    local = global_batch_size // world_size
    first = step * global_batch_size + rank * local
    samples = [dataset[(first + i) % n] for i in range(local)]
    return Batch(
        tokens=torch.stack([s["tokens"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        loss_mask=torch.stack([s["loss_mask"] for s in samples]),
        position_ids=torch.stack([s["position_ids"] for s in samples]),
    )


def iterate_batches(
    dataset: Any,
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_steps: int | None = None,
) -> Iterator[Batch]:
    """:func:`get_batch` for ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever).

    Resuming at ``start_step`` gives the batches an uninterrupted run would have seen.
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield get_batch(dataset, step, global_batch_size, rank, world_size)
        step += 1
