"""Tokenizers that need no download: a byte-level BPE trained offline, and raw bytes.

The BPE is GPT-2's scheme (Radford et al. 2019: byte-level alphabet, GPT-2 pre-tokenization regex),
trained with the ``tokenizers`` library on the training split only. An 8,192-token BPE trains on the
9 MB Shakespeare training split in about 4 s on 2 cores and gives about 3.4 bytes/token.

Both tokenizers expose what megatron-core's ``GPTDataset`` reads from ``GPTDatasetConfig.tokenizer``:
``eod``, ``pad`` (distinct from ``eod``, so megatron masks padding without masking document ends),
``vocab_size`` and ``unique_identifiers`` (hashed into megatron's index-cache key, so it names the
tokenizer's content), plus ``tokenize``/``detokenize``/``tokenize_batch``.

Trained BPEs are cached as ``tokenizers`` JSON under :func:`cache_dir` (``$LRSCALE_CACHE``, default
``~/.cache/lrscale_megatron``), keyed by a hash of the training documents and the vocabulary size, so a
second call with the same corpus loads the file instead of training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_BPE_FORMAT = "bytelevel-bpe-v1"  # bump when the training recipe changes, to invalidate caches
_ENCODE_BATCH_CHARS = 4_000_000  # one 20 MB string peaks at 3 GB inside `tokenizers`; stay far below


class Tokenizer(Protocol):
    """What the data path and megatron-core's ``GPTDataset`` need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eod(self) -> int: ...
    @property
    def pad(self) -> int: ...
    @property
    def unique_identifiers(self) -> dict[str, Any]: ...
    def tokenize(self, text: str) -> list[int]: ...
    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...


def cache_dir() -> Path:
    """``$LRSCALE_CACHE`` if set, else ``~/.cache/lrscale_megatron``."""
    env = os.environ.get("LRSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lrscale_megatron"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 is end-of-document, 257 is padding."""

    vocab_size = 258
    eod = 256
    pad = 257

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "ByteTokenizer", "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped and invalid UTF-8 is replaced (a sample cut
        mid-character decodes with a replacement character)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class VocabInfo:
    """The special-token ids of a corpus tokenized elsewhere (C4 or The Pile ``.bin/.idx`` made with
    Megatron-LM's ``tools/preprocess_data.py``): enough for megatron's ``GPTDataset``, no text I/O.

    Attributes:
        vocab_size: the tokenizer's vocabulary size (50257 for GPT-2).
        eod: the end-of-document id appended to each document (50256 for GPT-2).
        pad: a padding id distinct from ``eod``; the default -1 never occurs in the data, so nothing
            is masked as padding.
        name: names the tokenizer in megatron's index-cache key.
    """

    vocab_size: int
    eod: int
    pad: int = -1
    name: str = "external"

    def __post_init__(self) -> None:
        if not 0 <= self.eod < self.vocab_size:
            raise ValueError(f"eod={self.eod} must lie in [0, vocab_size={self.vocab_size})")
        if self.pad == self.eod:
            raise ValueError(f"pad={self.pad} equals eod; give a distinct id, or -1 for none")

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "VocabInfo", "name": self.name, "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError(f"VocabInfo({self.name!r}) carries token ids only; it cannot tokenize text")

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError(f"VocabInfo({self.name!r}) carries token ids only; it cannot detokenize")


class BPETokenizer:
    """A trained byte-level BPE (a ``tokenizers.Tokenizer``) with the megatron-facing interface."""

    def __init__(self, tokenizer: Any, path: Path | None = None) -> None:
        eod, pad = tokenizer.token_to_id(EOD_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
        if eod is None or pad is None:
            raise ValueError(f"tokenizer lacks the special tokens {EOD_TOKEN!r} and {PAD_TOKEN!r}")
        self._tok = tokenizer
        self.path = path
        self._eod: int = eod
        self._pad: int = pad
        self._digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), Path(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ``tokenizers`` JSON to ``path`` (atomically)."""
        _atomic_save(self._tok, Path(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return {"class": "BPETokenizer", "vocab_size": self.vocab_size, "sha256": self._digest}

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=True))


def tokenize_documents(
    tokenizer: Tokenizer, documents: Sequence[str], batch_chars: int = _ENCODE_BATCH_CHARS
) -> Iterator[list[int]]:
    """Token ids of each document followed by ``tokenizer.eod``, encoded a few MB at a time."""
    start = 0
    while start < len(documents):
        stop, chars = start, 0
        while stop < len(documents) and (stop == start or chars + len(documents[stop]) <= batch_chars):
            chars += len(documents[stop])
            stop += 1
        for ids in tokenizer.tokenize_batch(documents[start:stop]):
            ids.append(tokenizer.eod)
            yield ids
        start = stop


def corpus_key(documents: Sequence[str], vocab_size: int) -> str:
    """sha256 over the training recipe, the vocabulary size and every document (length-prefixed)."""
    h = hashlib.sha256(f"{_BPE_FORMAT}|{vocab_size}|{EOD_TOKEN}|{PAD_TOKEN}|{len(documents)}".encode())
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def train_bpe(documents: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE with ``vocab_size`` entries (including the 2 special tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tok


def load_or_train_bpe(
    documents: Sequence[str], vocab_size: int = 8192, cache: str | os.PathLike[str] | None = None
) -> BPETokenizer:
    """The BPE for these documents from the cache, training and caching it on a miss.

    Args:
        documents: the training documents (train split only, so validation text stays unseen).
        vocab_size: entries including the 2 special tokens; at least 258 (256 bytes + 2).
        cache: the cache directory; default :func:`cache_dir`.

    Run this once before launching many ranks (``lrscale prepare-data``): ranks that all miss
    the cache would each train, and the file write is atomic, so the last one wins.
    """
    if vocab_size < 258:
        raise ValueError(
            f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 bytes + 2 specials = 258"
        )
    if not documents:
        raise ValueError("documents is empty: nothing to train a tokenizer on")
    root = Path(cache) if cache is not None else cache_dir()
    path = root / "tokenizers" / f"bpe-{vocab_size}-{corpus_key(documents, vocab_size)[:16]}.json"
    if path.is_file():
        logger.info("tokenizer cache hit: %s", path)
        return BPETokenizer.from_file(path)

    n_chars = sum(len(d) for d in documents)
    logger.info(
        "training a %d-token byte-level BPE on %d documents (%.1f MB)",
        vocab_size,
        len(documents),
        n_chars / 1e6,
    )
    t0 = time.perf_counter()
    tok = train_bpe(documents, vocab_size)
    logger.info("trained in %.1f s; caching at %s", time.perf_counter() - t0, path)
    _atomic_save(tok, path)
    return BPETokenizer(tok, path)


def _atomic_save(tok: Any, path: Path) -> None:
    """``tok.save(path)`` through a temporary file, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
