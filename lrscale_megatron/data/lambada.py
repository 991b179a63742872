"""LAMBADA-style last-word passages from held-out text: pure Python, no torch.

LAMBADA (Paperno et al. 2016) asks a language model for the last word of a passage whose last word
human readers can only guess from the whole passage, not from the last sentence alone. Its passages
come from novels the model never saw; the metric is greedy last-word accuracy: the word counts as
right when, fed the passage, the model's argmax reproduces every token of the word (GPT-2's and
lm-evaluation-harness's reading).

Here the passages are cut from a corpus split the model never trained on (the held-out works of the
training corpus, or the whole distribution-shift corpus), and LAMBADA's human filter is replaced by a
mechanical one that keeps its point, *the answer is in the context, not in local syntax*:

1. the passage ends at the end of a sentence (``.``, ``!``, ``?``, ``;``), its last word alphabetic, at
   least ``min_word_chars`` letters long, not a stop word and not all capitals (a play's speaker tags
   and headings);
2. the same word (case-insensitive) occurs earlier in the passage, at least one sentence before the
   last, so a model that reads the context can copy it, and one that reads only the local syntax
   cannot know which word it is;
3. the passage is the ``context_chars`` characters before the word, cut at a whitespace.

Passages are drawn deterministically (sorted candidate positions, evenly spaced), so every run of a
comparison is scored on the same passages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: English function words that the filter never takes as a target (too guessable from syntax).
STOP_WORDS = frozenset(
    [
        "the",
        "and",
        "that",
        "with",
        "this",
        "from",
        "have",
        "they",
        "will",
        "what",
        "when",
        "which",
        "there",
        "their",
        "them",
        "then",
        "than",
        "shall",
        "thou",
        "thee",
        "thy",
        "thine",
        "your",
        "yours",
        "were",
        "been",
        "into",
        "upon",
        "unto",
        "would",
        "could",
        "should",
        "must",
        "more",
        "most",
        "some",
        "such",
        "only",
        "very",
        "also",
        "here",
        "where",
        "whom",
        "whose",
        "those",
        "these",
        "being",
        "doth",
        "hath",
        "art",
        "not",
        "nor",
        "but",
        "for",
        "are",
        "was",
        "his",
        "her",
        "him",
        "she",
        "our",
        "ours",
        "you",
        "all",
        "any",
        "one",
        "two",
        "can",
        "may",
        "let",
        "now",
        "yet",
        "how",
        "who",
        "why",
    ]
)

_END = re.compile(r"\b([A-Za-z]+)[.!?;]")
_SENTENCE = re.compile(r"[.!?;]")


@dataclass(frozen=True)
class Passage:
    """One last-word item.

    Attributes:
        context: the text before the target word, ending in a space.
        target: the word to predict (without the space before it or the punctuation after it).
        document: index of the source document in the texts given to :func:`build_passages`.
    """

    context: str
    target: str
    document: int


def _candidates(text: str, doc: int, context_chars: int, min_word_chars: int) -> list[Passage]:
    out: list[Passage] = []
    for m in _END.finditer(text):
        word, start = m.group(1), m.start(1)
        if len(word) < min_word_chars or word.lower() in STOP_WORDS or start < context_chars // 2:
            continue
        if word.isupper():  # speaker tags ("KING HENRY.") and headings, not prose
            continue
        if start == 0 or not text[start - 1].isspace():
            continue
        lo = max(0, start - context_chars)
        cut = text.find(" ", lo) if lo > 0 else 0
        if cut < 0 or cut >= start:
            continue
        context = text[cut + (1 if lo > 0 else 0) : start]
        context = re.sub(r"\s+", " ", context)
        if not context.endswith(" "):
            context += " "
        # the word must occur before the last sentence of the context (not just in the local syntax)
        ends = [s.end() for s in _SENTENCE.finditer(context[:-1])]
        earlier = context[: ends[-1]] if ends else ""
        if re.search(rf"\b{re.escape(word)}\b", earlier, flags=re.IGNORECASE):
            out.append(Passage(context=context, target=word, document=doc))
    return out


def build_passages(
    texts: Sequence[str], n: int, context_chars: int = 400, min_word_chars: int = 4
) -> list[Passage]:
    """Up to ``n`` passages from ``texts``, evenly spaced over all candidates (deterministic).

    Raises:
        ValueError: for ``n < 1``, ``context_chars < 32`` or ``min_word_chars < 1``.
    """
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one passage")
    if context_chars < 32:
        raise ValueError(f"context_chars={context_chars}: use at least 32 characters of context")
    if min_word_chars < 1:
        raise ValueError(f"min_word_chars={min_word_chars}: use at least 1")
    cands = [p for i, t in enumerate(texts) for p in _candidates(t, i, context_chars, min_word_chars)]
    if len(cands) <= n:
        return cands
    step = len(cands) / n
    return [cands[int(i * step)] for i in range(n)]


@dataclass(frozen=True)
class EncodedPassage:
    """A passage as token ids: ``context`` then ``target`` (the word with its leading space)."""

    context: tuple[int, ...]
    target: tuple[int, ...]


def encode_passages(passages: Sequence[Passage], tokenizer, seq_length: int) -> list[EncodedPassage]:
    """Tokenize; the context is cut from the left so ``len(context) + len(target) <= seq_length``.

    The space before the word belongs to the target (GPT-2 BPE merges it into the word's first token;
    for the byte tokenizer it is one more byte to get right). Passages whose target alone does not
    fit are dropped.
    """
    out: list[EncodedPassage] = []
    for p in passages:
        ctx = tokenizer.tokenize(p.context.rstrip(" "))
        tgt = tokenizer.tokenize(" " + p.target)
        room = seq_length - len(tgt)
        if room < 1 or not tgt:
            continue
        out.append(EncodedPassage(context=tuple(ctx[-room:]), target=tuple(tgt)))
    return out
