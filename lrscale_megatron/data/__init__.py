"""The data path: bundled corpora → offline tokenizer → Megatron ``.bin/.idx`` → GPT batches.

    prepared = prepare_corpus("shakespeare", vocab_size=8192, seq_length=512)
    sets = build_datasets(prepared.train_prefix, prepared.valid_prefix, 512, num_train_samples=64_000,
                          tokenizer=prepared.tokenizer, prefix_shift=prepared.shift_prefix)
    batch = get_batch(sets.train, step, global_batch_size=64, rank=dp_rank, world_size=dp_size)

Any Megatron prefix (C4, The Pile) goes into :func:`build_datasets` in place of ours, with its
tokenizer's ids: ``tokenizer=VocabInfo(vocab_size=50257, eod=50256)`` for GPT-2-tokenized data.
"""

from lrscale_megatron.data.corpora import (
    CORPORA,
    SHIFT_CORPUS,
    CorpusSplit,
    Document,
    kjv_documents,
    load_corpus,
    shakespeare_documents,
    split_corpus,
    split_documents,
)
from lrscale_megatron.data.datasets import Batch, GPTDatasets, build_datasets, get_batch, iterate_batches
from lrscale_megatron.data.indexed import count_tokens, read_indexed_dataset, write_indexed_dataset
from lrscale_megatron.data.prepare import PreparedCorpus, prepare_corpus, prepare_main
from lrscale_megatron.data.shakespeare import shakespeare_texts
from lrscale_megatron.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    VocabInfo,
    cache_dir,
    load_or_train_bpe,
    tokenize_documents,
    train_bpe,
)

__all__ = [
    "CORPORA",
    "SHIFT_CORPUS",
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "CorpusSplit",
    "Document",
    "GPTDatasets",
    "PreparedCorpus",
    "Tokenizer",
    "VocabInfo",
    "build_datasets",
    "cache_dir",
    "count_tokens",
    "get_batch",
    "iterate_batches",
    "kjv_documents",
    "load_corpus",
    "load_or_train_bpe",
    "prepare_corpus",
    "prepare_main",
    "read_indexed_dataset",
    "shakespeare_documents",
    "shakespeare_texts",
    "split_corpus",
    "split_documents",
    "tokenize_documents",
    "train_bpe",
    "write_indexed_dataset",
]
