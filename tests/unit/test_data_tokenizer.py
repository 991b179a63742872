"""Byte and BPE tokenizers: round trips on real text, special tokens, the content-keyed cache."""

from __future__ import annotations

import os

import pytest

from lrscale_megatron.data import tokenizer as tokmod
from lrscale_megatron.data.corpora import shakespeare_documents
from lrscale_megatron.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    cache_dir,
    load_or_train_bpe,
    tokenize_documents,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    docs = shakespeare_documents()
    return [d.text[:60_000] for d in docs[:8]]  # ~0.5 MB: trains a 512-token BPE in well under 1 s


@pytest.fixture(scope="module")
def bpe(texts, tmp_path_factory) -> BPETokenizer:
    return load_or_train_bpe(texts, 512, cache=tmp_path_factory.mktemp("tokcache"))


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "O Romeo, Romeo! — wherefore art thou Romeo? ñ 日本"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.detokenize([*ids, tok.eod, tok.pad]) == text
    assert len({tok.eod, tok.pad}) == 2 and tok.vocab_size == 258


def test_bpe_round_trip_on_real_text(bpe, texts):
    assert bpe.vocab_size == 512
    assert bpe.eod != bpe.pad
    held_out = shakespeare_documents()[-1].text[:20_000]  # not among the training texts
    for text in (texts[0], held_out, "  leading spaces\n\n\ttabs and ünïcödé  "):
        ids = bpe.tokenize(text)
        assert bpe.detokenize(ids) == text
        assert bpe.eod not in ids and bpe.pad not in ids
    # It compresses: more than one byte per token even at vocab 512.
    assert len(texts[0].encode()) / len(bpe.tokenize(texts[0])) > 1.5


def test_bpe_unique_identifiers_name_the_content(bpe, texts, tmp_path):
    other = load_or_train_bpe(texts[:4], 512, cache=tmp_path)
    assert bpe.unique_identifiers != other.unique_identifiers
    assert bpe.unique_identifiers["vocab_size"] == 512


def test_cache_hit_does_not_train_again(texts, tmp_path, monkeypatch):
    calls = []
    real_train = tokmod.train_bpe

    def counting_train(docs, vocab_size):
        calls.append(vocab_size)
        return real_train(docs, vocab_size)

    monkeypatch.setattr(tokmod, "train_bpe", counting_train)
    monkeypatch.setenv("LRSCALE_CACHE", str(tmp_path))
    first = load_or_train_bpe(texts[:3], 300)
    assert calls == [300] and first.path is not None and first.path.parent == tmp_path / "tokenizers"
    mtime = os.stat(first.path).st_mtime_ns
    second = load_or_train_bpe(texts[:3], 300)
    assert calls == [300], "a cache hit must not train"
    assert second.path == first.path and os.stat(first.path).st_mtime_ns == mtime
    assert second.unique_identifiers == first.unique_identifiers
    assert second.tokenize(texts[0][:2000]) == first.tokenize(texts[0][:2000])
    load_or_train_bpe(texts[:3], 310)  # another vocab size is another key
    load_or_train_bpe(texts[:2], 300)  # so is another corpus
    assert calls == [300, 310, 300]


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LRSCALE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LRSCALE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "lrscale_megatron")


def test_bpe_training_is_deterministic(texts, tmp_path):
    a = load_or_train_bpe(texts[:3], 400, cache=tmp_path / "a")
    b = load_or_train_bpe(texts[:3], 400, cache=tmp_path / "b")
    assert a.unique_identifiers == b.unique_identifiers


def test_tokenize_documents_batches_without_changing_ids(bpe, texts):
    docs = [t[:5_000] for t in texts]
    whole = list(tokenize_documents(bpe, docs))
    tiny_batches = list(tokenize_documents(bpe, docs, batch_chars=1))
    assert whole == tiny_batches
    assert all(ids[-1] == bpe.eod and bpe.eod not in ids[:-1] for ids in whole)
    assert [bpe.detokenize(ids) for ids in whole] == docs


def test_vocab_too_small_is_rejected(texts, tmp_path):
    with pytest.raises(ValueError, match="258"):
        load_or_train_bpe(texts, 100, cache=tmp_path)
