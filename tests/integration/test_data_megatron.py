"""The data path through real megatron-core: .bin/.idx round trip, GPTDataset samples, batches, prepare."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lrscale_megatron.data import prepare as prepmod
from lrscale_megatron.data import tokenizer as tokmod
from lrscale_megatron.data.datasets import build_datasets, get_batch, iterate_batches
from lrscale_megatron.data.indexed import count_tokens, read_indexed_dataset, write_indexed_dataset
from lrscale_megatron.data.prepare import PreparedCorpus, prepare_corpus, prepare_main
from lrscale_megatron.data.tokenizer import ByteTokenizer, VocabInfo

SEQ = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedCorpus:
    """A 512-token BPE on the first 4 training works, with held-out validation and a KJV shift set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRSCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return prepare_corpus(
            "shakespeare",
            vocab_size=512,
            out_dir=tmp_path_factory.mktemp("data"),
            seq_length=SEQ,
            max_documents=4,
        )


def test_indexed_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70_000, size=n) for n in (1, 5, 1000, 3)]  # > uint16: int32 files
    assert write_indexed_dataset(tmp_path / "x", docs, vocab_size=70_000) == (4, 1009)
    back = read_indexed_dataset(tmp_path / "x")
    assert len(back) == 4 and all(np.array_equal(a, b) for a, b in zip(docs, back))
    assert back[0].dtype == np.int32
    small = [d % 258 for d in docs]
    write_indexed_dataset(tmp_path / "y", small, vocab_size=258)
    assert read_indexed_dataset(tmp_path / "y")[2].dtype == np.uint16
    assert count_tokens(tmp_path / "y") == (4, 1009)
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(tmp_path / "z", [[0, 258]], vocab_size=258)
    assert not (tmp_path / "z.idx").exists()


def test_prepared_files_hold_the_tokenized_documents(prepared):
    tok = prepared.tokenizer
    train = read_indexed_dataset(prepared.train_prefix)
    valid = read_indexed_dataset(prepared.valid_prefix)
    assert len(train) == 4 and len(valid) == prepared.manifest["splits"]["valid"]["documents"]
    for doc in (*train, *valid):
        assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
    # Decoding the first training document gives back a Shakespeare text, whole.
    text = tok.detokenize(train[0].tolist())
    assert text.startswith(("ALL", "All", "THE", "The")) and len(text) > 50_000
    # Validation is held out: no validation document equals or is a training document.
    train_texts = {tok.detokenize(d.tolist()) for d in train}
    assert not train_texts & {tok.detokenize(d.tolist()) for d in valid}
    names = prepared.manifest["valid_documents"]
    assert names and all(g in " ".join(names) for g in prepared.manifest["valid_groups"])
    shift = read_indexed_dataset(prepared.shift_prefix)
    assert tok.detokenize(shift[0].tolist()).startswith("In the beginning God created")


def test_gpt_samples_shift_labels_and_unmask_every_position(prepared, tmp_path):
    sets = build_datasets(
        prepared.train_prefix,
        prepared.valid_prefix,
        SEQ,
        num_train_samples=200,
        tokenizer=prepared.tokenizer,
        prefix_shift=prepared.shift_prefix,
        index_cache_dir=tmp_path,
    )
    assert len(sets.train) >= 200 and len(sets.valid) > 0 and sets.shift is not None
    stream = np.concatenate(read_indexed_dataset(prepared.train_prefix))
    for i in (0, 1, 57):
        s = sets.train[i]
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])  # labels are tokens shifted by one
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert torch.all(s["loss_mask"] == 1.0)
        # Every sample is a contiguous window of the concatenated documents.
        window = np.concatenate([s["tokens"].numpy(), s["labels"][-1:].numpy()])
        starts = np.flatnonzero(stream[: len(stream) - SEQ] == window[0])
        assert any(np.array_equal(stream[j : j + SEQ + 1], window) for j in starts)
    # The validation set's samples come from the validation file only.
    valid_stream = np.concatenate(read_indexed_dataset(prepared.valid_prefix))
    v = sets.valid[0]["tokens"].numpy()
    assert any(np.array_equal(valid_stream[j : j + SEQ], v) for j in np.flatnonzero(valid_stream == v[0]))


def test_batches_are_deterministic_and_ranks_disjoint(prepared, tmp_path):
    kwargs = dict(seq_length=SEQ, num_train_samples=128, tokenizer=prepared.tokenizer)
    a = build_datasets(
        prepared.train_prefix, prepared.valid_prefix, seed=7, index_cache_dir=tmp_path / "a", **kwargs
    )
    b = build_datasets(
        prepared.train_prefix, prepared.valid_prefix, seed=7, index_cache_dir=tmp_path / "b", **kwargs
    )
    c = build_datasets(
        prepared.train_prefix, prepared.valid_prefix, seed=8, index_cache_dir=tmp_path / "c", **kwargs
    )
    full = get_batch(a.train, step=3, global_batch_size=8)
    assert full.tokens.shape == (8, SEQ) and full.tokens.dtype == torch.int64
    assert full.loss_mask.dtype == torch.float32
    assert torch.equal(full.tokens, get_batch(b.train, step=3, global_batch_size=8).tokens)  # same seed
    assert not torch.equal(full.tokens, get_batch(c.train, step=3, global_batch_size=8).tokens)
    assert not torch.equal(full.tokens, get_batch(a.train, step=4, global_batch_size=8).tokens)
    parts = [get_batch(a.train, step=3, global_batch_size=8, rank=r, world_size=4) for r in range(4)]
    assert all(p.tokens.shape == (2, SEQ) for p in parts)
    assert torch.equal(torch.cat([p.tokens for p in parts]), full.tokens)  # ranks tile the global batch
    rows = {tuple(row.tolist()) for p in parts for row in p.tokens}
    assert len(rows) == 8  # and no two ranks hold the same sample
    resumed = next(iterate_batches(a.train, 8, rank=1, world_size=4, start_step=3))
    assert torch.equal(resumed.labels, parts[1].labels)
    assert len(list(iterate_batches(a.train, 8, num_steps=5))) == 5
    with pytest.raises(ValueError, match=r"global_batch_size\(6\).*world_size\(4\)"):
        get_batch(a.train, 0, global_batch_size=6, rank=0, world_size=4)


def test_prepare_is_cached(prepared, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must neither tokenize, train nor write")

    monkeypatch.setattr(prepmod, "write_indexed_dataset", fail)
    monkeypatch.setattr(prepmod, "load_or_train_bpe", fail)
    monkeypatch.setattr(tokmod, "train_bpe", fail)
    again = prepare_corpus(
        "shakespeare", vocab_size=512, out_dir=prepared.directory.parent, seq_length=SEQ, max_documents=4
    )
    assert again.train_prefix == prepared.train_prefix
    assert again.tokenizer.unique_identifiers == prepared.tokenizer.unique_identifiers
    assert again.manifest == prepared.manifest
    with pytest.raises(ValueError, match="seq_length"):
        prepare_corpus(
            "shakespeare",
            vocab_size=512,
            out_dir=prepared.directory.parent,
            seq_length=10**9,
            max_documents=4,
        )


def test_prepare_main_byte_kjv(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        rc = prepare_main(
            [
                "--corpus",
                "kjv",
                "--tokenizer",
                "byte",
                "--out",
                str(tmp_path),
                "--max-documents",
                "3",
                "--seq-length",
                "32",
            ]
        )
    assert rc == 0
    assert "train prefix" in caplog.text
    (directory,) = tmp_path.iterdir()
    train = read_indexed_dataset(directory / "train")
    assert ByteTokenizer().detokenize(train[0].tolist()).startswith("In the beginning God created")
    assert (directory / "shift-shakespeare.idx").is_file()
    assert prepare_main(["--corpus", "kjv", "--shift", "kjv", "--out", str(tmp_path)]) == 2


def test_foreign_prefix_plugs_in_with_vocab_info(tmp_path):
    """A prefix written elsewhere (GPT-2 ids, int32 like a Pile file) reads with just its vocabulary ids."""
    gpt2 = VocabInfo(vocab_size=50257, eod=50256, name="gpt2")
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(0, 50256, size=n), gpt2.eod) for n in (300, 50, 700)]
    for split in ("train", "valid"):
        write_indexed_dataset(tmp_path / split, docs, vocab_size=70_000)  # int32 on disk
    sets = build_datasets(tmp_path / "train", tmp_path / "valid", 32, num_train_samples=40, tokenizer=gpt2)
    stream = np.concatenate(docs)
    batch = get_batch(sets.train, 0, global_batch_size=4)
    for row in batch.tokens.numpy():
        assert any(np.array_equal(stream[j : j + 32], row) for j in np.flatnonzero(stream == row[0]))
    assert (tmp_path / "train" / "cache" / "GPTDataset_indices").is_dir()  # megatron's default
    with pytest.raises(ValueError, match="pad"):
        VocabInfo(vocab_size=10, eod=3, pad=3)
