"""Megatron ``IndexedDataset`` files (``PREFIX.bin`` + ``PREFIX.idx``), written and read with megatron-core.

The format is megatron-core's own (``megatron.core.datasets.indexed_dataset``): one document per
``IndexedDatasetBuilder.add_document`` call, token dtype chosen by ``DType.optimal_dtype`` (uint16
below 65,500 tokens, else int32). Files written here are the same as those of Megatron-LM's
``tools/preprocess_data.py --append-eod``, so a user's own C4 or Pile prefixes plug into
:func:`lrscale_megatron.data.datasets.build_datasets` unchanged, and ours into Megatron-LM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

logger = logging.getLogger(__name__)


def indexed_dataset_exists(prefix: str | os.PathLike[str]) -> bool:
    """Both ``PREFIX.bin`` and ``PREFIX.idx`` exist."""
    return os.path.isfile(get_bin_path(str(prefix))) and os.path.isfile(get_idx_path(str(prefix)))


def write_indexed_dataset(
    prefix: str | os.PathLike[str], documents: Iterable[Sequence[int] | np.ndarray], vocab_size: int
) -> tuple[int, int]:
    """Write token documents to ``PREFIX.bin/.idx``; returns ``(n_documents, n_tokens)``.

    Files are written under temporary names and renamed at the end, so a reader never sees a
    half-written pair and an interrupted run leaves no ``PREFIX.idx`` behind.
    """
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(vocab_size)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=dtype)
    n_docs = n_tokens = 0
    try:
        for doc in documents:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(
                    f"document {n_docs} has token ids in [{arr.min()}, {arr.max()}], outside [0, {vocab_size})"
                )
            builder.add_document(arr.astype(dtype), [int(arr.size)])
            n_docs += 1
            n_tokens += int(arr.size)
        builder.finalize(get_idx_path(tmp))
        os.replace(get_bin_path(tmp), get_bin_path(prefix))
        os.replace(get_idx_path(tmp), get_idx_path(prefix))  # the .idx last: its presence marks completion
    finally:
        for path in (get_bin_path(tmp), get_idx_path(tmp)):
            if os.path.exists(path):
                os.unlink(path)
    logger.info(
        "wrote %s.{bin,idx}: %d documents, %d tokens (%s)", prefix, n_docs, n_tokens, np.dtype(dtype).name
    )
    return n_docs, n_tokens


def read_indexed_dataset(prefix: str | os.PathLike[str]) -> list[np.ndarray]:
    """Every document of ``PREFIX.bin/.idx`` as an array of token ids (for checks and small corpora)."""
    ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    return [np.array(ds[i]) for i in range(len(ds))]


def count_tokens(prefix: str | os.PathLike[str]) -> tuple[int, int]:
    """``(n_documents, n_tokens)`` of ``PREFIX.bin/.idx``, read from the index only."""
    ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    return len(ds), int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum())
