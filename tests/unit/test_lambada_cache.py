"""The last-word passages are drawn once per prepared corpus and reused while nothing they depend on
changed: the corpus request, the held-out documents, the tokenizer, the passage rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lrscale_megatron.data.tokenizer import ByteTokenizer
from lrscale_megatron.train import downstream

TEXT = (
    "The miller kept a lantern by the door. Every night he lit it for travellers. "
    "One winter a stranger came and asked for shelter. The miller showed him the lantern. "
    "In the morning the stranger was gone, and so was the lantern. "
) * 4


@pytest.fixture
def reads(monkeypatch):
    calls: list[str] = []

    def fake_texts(prepared, source):
        calls.append(source)
        return [TEXT], "fake (held-out works)"

    monkeypatch.setattr(downstream, "held_out_texts", fake_texts)
    return calls


def _prepared(directory, valid=("w1",)):
    manifest = {"request": {"corpus": "fake", "tokenizer": "byte"}, "valid_documents": list(valid)}
    return SimpleNamespace(directory=directory, manifest=manifest, tokenizer=ByteTokenizer())


def test_second_run_reuses_the_draw_without_reading_the_corpus(tmp_path, reads):
    prep = _prepared(tmp_path)
    first = downstream.held_out_passages(prep, "valid", 8, 96, True)
    second = downstream.held_out_passages(prep, "valid", 8, 96, True)
    assert reads == ["valid"]
    assert first == second and first[0]
    assert (tmp_path / "lambada-valid-n8-s96.json").is_file()


@pytest.mark.parametrize("change", ["held_out", "rules", "tokenizer"])
def test_a_changed_dependency_draws_again(tmp_path, reads, monkeypatch, change):
    (first, _) = downstream.held_out_passages(_prepared(tmp_path), "valid", 8, 96, True)
    prep = _prepared(tmp_path)
    if change == "held_out":
        prep = _prepared(tmp_path, valid=("w1", "w2"))
    elif change == "rules":
        monkeypatch.setattr(downstream, "_rules_digest", lambda: "edited-rules")
    else:
        prep.tokenizer = SimpleNamespace(
            vocab_size=300, tokenize=lambda s: [b + 2 for b in s.encode()]
        )  # another tokenizer: other ids
    again = downstream.held_out_passages(prep, "valid", 8, 96, True)
    assert reads == ["valid", "valid"]
    if change == "tokenizer":  # the redraw is encoded with the new tokenizer, not served stale
        assert again[0][0].target == tuple(b + 2 for b in first[0].target)


def test_a_torn_cache_file_is_drawn_again_and_rewritten(tmp_path, reads):
    prep = _prepared(tmp_path)
    good = downstream.held_out_passages(prep, "valid", 8, 96, True)
    path = tmp_path / "lambada-valid-n8-s96.json"
    path.write_text(path.read_text()[:40])
    assert downstream.held_out_passages(prep, "valid", 8, 96, True) == good
    assert reads == ["valid", "valid"]
    assert downstream.held_out_passages(prep, "valid", 8, 96, True) == good and len(reads) == 2


def test_an_unwritable_cache_directory_costs_a_redraw_not_the_run(tmp_path, reads):
    prep = _prepared(tmp_path / "missing" / "dir")  # cannot be written: the parent does not exist
    a = downstream.held_out_passages(prep, "valid", 8, 96, True)
    b = downstream.held_out_passages(prep, "valid", 8, 96, True)
    assert a == b and reads == ["valid", "valid"]
