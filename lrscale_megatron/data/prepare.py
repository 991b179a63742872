"""Corpus → tokenizer → ``.bin/.idx`` prefixes, cached; and the ``lrscale prepare-data`` command.

One process::

    lrscale prepare-data --corpus shakespeare --vocab-size 8192 --out data/
    python -m lrscale_megatron.data.prepare --corpus kjv --tokenizer byte --out data/

Run it once before launching many ranks (one node or many): the outputs are plain files that every
rank then reads. A second run with the same arguments finds ``manifest.json`` and returns at once.

Layout of ``OUT/<corpus>-<tokenizer>/``: ``train.{bin,idx}``, ``valid.{bin,idx}`` (held-out works),
``shift-<other corpus>.{bin,idx}`` (the whole other corpus, for the distribution-shift check),
``tokenizer.json`` (BPE only) and ``manifest.json``, written last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrscale_megatron.data.corpora import CORPORA, SHIFT_CORPUS, load_corpus, split_documents
from lrscale_megatron.data.indexed import count_tokens, indexed_dataset_exists, write_indexed_dataset
from lrscale_megatron.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    cache_dir,
    load_or_train_bpe,
    tokenize_documents,
)

logger = logging.getLogger(__name__)

_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PreparedCorpus:
    """The outputs of :func:`prepare_corpus`.

    Attributes:
        train_prefix, valid_prefix: ``.bin/.idx`` path prefixes for :func:`build_datasets`.
        shift_prefix: the distribution-shift corpus's prefix, ``None`` when ``shift=None``.
        tokenizer: the tokenizer the files were written with.
        directory: where the files live.
        manifest: the request, token/document/byte counts and the held-out document names.
    """

    train_prefix: str
    valid_prefix: str
    shift_prefix: str | None
    tokenizer: Tokenizer
    directory: Path
    manifest: dict[str, Any]


def _load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    return ByteTokenizer() if kind == "byte" else BPETokenizer.from_file(directory / "tokenizer.json")


def _check_lengths(manifest: dict[str, Any], seq_length: int | None) -> None:
    if seq_length is None:
        return
    for split, counts in manifest["splits"].items():
        if counts["tokens"] < seq_length + 1:
            raise ValueError(
                f"the {split} split holds {counts['tokens']} tokens, fewer than seq_length + 1 = "
                f"{seq_length + 1}; use a shorter seq_length or more documents"
            )


def prepare_corpus(
    name: str = "shakespeare",
    vocab_size: int = 8192,
    out_dir: str | os.PathLike[str] | None = None,
    seq_length: int | None = None,
    tokenizer: str = "bpe",
    valid_fraction: float = 0.05,
    seed: int = 0,
    shift: str | None = "auto",
    max_documents: int | None = None,
) -> PreparedCorpus:
    """Split, tokenize and write a corpus, or return the cached result of an identical earlier call.

    Args:
        name: a corpus from :data:`~lrscale_megatron.data.corpora.CORPORA`.
        vocab_size: BPE entries including the 2 special tokens (ignored for ``tokenizer="byte"``).
        out_dir: parent directory; default ``<cache_dir()>/data``.
        seq_length: when given, check every split holds at least one sample of this length.
        tokenizer: ``"bpe"`` (trained on the training split, cached) or ``"byte"`` (258 ids).
        valid_fraction: share of characters held out, by whole work/book.
        seed: seed of the document-level split.
        shift: the distribution-shift corpus: ``"auto"`` (:data:`SHIFT_CORPUS`), a corpus name, or ``None``.
        max_documents: keep only the first N documents of each split (for quick tests).

    Not collective: under ``torch.distributed`` call it on rank 0 and barrier before the other ranks
    call it (they then hit the cache), or run ``lrscale prepare-data`` before launching.
    """
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r} is unknown; choose one of {CORPORA}")
    if tokenizer not in ("bpe", "byte"):
        raise ValueError(f"tokenizer={tokenizer!r}: choose 'bpe' or 'byte'")
    shift_name = SHIFT_CORPUS[name] if shift == "auto" else shift
    if shift_name is not None and (shift_name not in CORPORA or shift_name == name):
        raise ValueError(
            f"shift={shift!r}: choose 'auto', None, or a corpus in {CORPORA} other than {name!r}"
        )
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents}: must be >= 1 or None")
    request = {
        "corpus": name,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer == "bpe" else ByteTokenizer.vocab_size,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "shift": shift_name,
        "max_documents": max_documents,
    }
    tag = f"bpe{vocab_size}" if tokenizer == "bpe" else "byte"
    if max_documents is not None:
        tag += f"-first{max_documents}"
    directory = Path(out_dir) if out_dir is not None else cache_dir() / "data"
    directory = directory / f"{name}-{tag}-s{seed}"
    prefixes = {"train": str(directory / "train"), "valid": str(directory / "valid")}
    if shift_name is not None:
        prefixes["shift"] = str(directory / f"shift-{shift_name}")
    manifest_path = directory / "manifest.json"

    # 1. Cache hit: the manifest (written last) matches the request and every file is there.
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("request") == request and all(map(indexed_dataset_exists, prefixes.values())):
            logger.info("data cache hit: %s", directory)
            _check_lengths(manifest, seq_length)
            return PreparedCorpus(
                train_prefix=prefixes["train"],
                valid_prefix=prefixes["valid"],
                shift_prefix=prefixes.get("shift"),
                tokenizer=_load_tokenizer(tokenizer, directory),
                directory=directory,
                manifest=manifest,
            )
        logger.info("%s does not match this request; rebuilding", manifest_path)

    # 2. Split by work/book; the shift corpus is used whole.
    t0 = time.perf_counter()
    split = split_documents(load_corpus(name), valid_fraction=valid_fraction, seed=seed)
    docs: dict[str, list[str]] = {"train": split.train, "valid": split.valid}
    if shift_name is not None:
        docs["shift"] = [d.text for d in load_corpus(shift_name)]
    if max_documents is not None:
        docs = {k: v[:max_documents] for k, v in docs.items()}
    logger.info(
        "%s: %d train / %d valid documents (held out: %s)%s",
        name,
        len(docs["train"]),
        len(docs["valid"]),
        ", ".join(split.valid_groups),
        f"; shift corpus {shift_name}: {len(docs['shift'])} documents" if shift_name else "",
    )

    # 3. Tokenizer: trained on the training split only (cached by content), copied next to the data.
    directory.mkdir(parents=True, exist_ok=True)
    tok: Tokenizer
    if tokenizer == "bpe":
        t_train = time.perf_counter()
        bpe = load_or_train_bpe(docs["train"], vocab_size)
        bpe_seconds = time.perf_counter() - t_train
        bpe.save(directory / "tokenizer.json")
        tok = bpe
    else:
        tok, bpe_seconds = ByteTokenizer(), 0.0

    # 4. Tokenize in batches and write one .bin/.idx pair per split.
    splits: dict[str, dict[str, int]] = {}
    for key, texts in docs.items():
        t_split = time.perf_counter()
        n_docs, n_tokens = write_indexed_dataset(
            prefixes[key], tokenize_documents(tok, texts), tok.vocab_size
        )
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        splits[key] = {"documents": n_docs, "tokens": n_tokens, "bytes": n_bytes}
        logger.info(
            "%s: %d documents, %.2f MB, %d tokens (%.2f bytes/token incl. EOD) in %.1f s",
            key,
            n_docs,
            n_bytes / 1e6,
            n_tokens,
            n_bytes / max(n_tokens, 1),
            time.perf_counter() - t_split,
        )

    manifest = {
        "version": _MANIFEST_VERSION,
        "request": request,
        "tokenizer": tok.unique_identifiers,
        "prefixes": {k: os.path.basename(v) for k, v in prefixes.items()},
        "splits": splits,
        "valid_groups": list(split.valid_groups),
        "valid_documents": split.valid_names[: len(docs["valid"])],
        "tokenizer_seconds": round(bpe_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = manifest_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    logger.info("prepared %s in %.1f s", directory, manifest["seconds"])
    _check_lengths(manifest, seq_length)
    for key, prefix in prefixes.items():  # the files agree with what was counted while writing
        if count_tokens(prefix) != (splits[key]["documents"], splits[key]["tokens"]):
            raise RuntimeError(f"{prefix}.bin/.idx does not hold what was written")
    return PreparedCorpus(
        train_prefix=prefixes["train"],
        valid_prefix=prefixes["valid"],
        shift_prefix=prefixes.get("shift"),
        tokenizer=tok,
        directory=directory,
        manifest=manifest,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrscale prepare-data",
        description="Tokenize a bundled corpus into Megatron .bin/.idx files (train, held-out valid, shift).",
    )
    p.add_argument("--corpus", choices=CORPORA, default="shakespeare")
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE entries incl. 2 special tokens")
    p.add_argument("--out", default=None, help="output directory (default: $LRSCALE_CACHE/data)")
    p.add_argument(
        "--seq-length", type=int, default=None, help="check each split holds one sample of this many tokens"
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.05, help="share of characters held out, by whole work"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document-level split")
    p.add_argument("--shift", default="auto", help="distribution-shift corpus: auto, none, or a corpus name")
    p.add_argument(
        "--max-documents", type=int, default=None, help="first N documents per split (quick tests)"
    )
    return p


def prepare_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lrscale prepare-data``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-file index chatter
    try:
        prepared = prepare_corpus(
            name=args.corpus,
            vocab_size=args.vocab_size,
            out_dir=args.out,
            seq_length=args.seq_length,
            tokenizer=args.tokenizer,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            shift=None if args.shift.lower() == "none" else args.shift,
            max_documents=args.max_documents,
        )
    except (ValueError, ModuleNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("train prefix: %s", prepared.train_prefix)
    logger.info("valid prefix: %s", prepared.valid_prefix)
    if prepared.shift_prefix:
        logger.info("shift prefix: %s", prepared.shift_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(prepare_main())
