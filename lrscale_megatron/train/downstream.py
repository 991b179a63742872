"""The downstream metric of a run: LAMBADA-style last-word accuracy on held-out passages.

:func:`held_out_passages` cuts the passages (:mod:`lrscale_megatron.data.lambada`) from the text the
model never trained on and tokenizes them with the run's tokenizer; :func:`last_word_accuracy` feeds
each passage to the model (eval mode, no grad) and scores the word as right when the greedy prediction
reproduces every one of its tokens, teacher-forced (lm-evaluation-harness's ``is_greedy``). It also
returns the word's mean negative log-likelihood (nats per word), a smoother reading of the same thing.

Tensor parallelism: the vocabulary-parallel logits are gathered over the tensor-parallel group before
the argmax. Pipeline parallelism is refused by the config (``data.lambada_passages``): only the last
stage holds logits. Every data-parallel rank scores all passages (they are few), so all ranks agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from lrscale_megatron.data.lambada import EncodedPassage, build_passages, encode_passages

logger = logging.getLogger(__name__)


def held_out_texts(prepared: Any, source: str) -> tuple[list[str], str]:
    """The raw texts the passages come from and their name: the held-out documents of a prepared corpus
    (``source="valid"``, by the names its manifest recorded) or the whole shift corpus (``"shift"``)."""
    from lrscale_megatron.data.corpora import load_corpus

    request = prepared.manifest["request"]
    if source == "shift":
        name = request["shift"]
        if name is None:
            raise ValueError("data.lambada_source='shift' but the run has no shift corpus; use 'valid'")
        return [d.text for d in load_corpus(name)], str(name)
    names = set(prepared.manifest["valid_documents"])
    texts = [d.text for d in load_corpus(request["corpus"]) if d.name in names]
    return texts, f"{request['corpus']} (held-out works)"


def held_out_passages(
    prepared: Any, source: str, n: int, seq_length: int, byte_level: bool
) -> tuple[list[EncodedPassage], str]:
    """``n`` encoded passages for a run of ``seq_length`` tokens, and where they come from."""
    texts, name = held_out_texts(prepared, source)
    # about one character per byte token, ~4 per BPE token; the encoder cuts what does not fit
    chars = max(32, seq_length - 16) if byte_level else 3 * seq_length
    passages = encode_passages(build_passages(texts, n, context_chars=chars), prepared.tokenizer, seq_length)
    if not passages:
        raise ValueError(
            f"no LAMBADA-style passage fits seq_length={seq_length} in {name}; "
            "set data.lambada_passages to 0 or use a longer model.seq_length"
        )
    return passages, name


def _logits(module: torch.nn.Module, tokens: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Full-vocabulary logits ``[b, s, v]`` of a megatron GPTModel (or any module called the same way)."""
    from lrscale_megatron.models.gpt import causal_mask

    s = tokens.shape[1]
    pos = torch.arange(s, device=tokens.device).unsqueeze(0).expand_as(tokens)
    out = module(tokens, pos, causal_mask(s).to(tokens.device))
    if tp_size > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        out = gather_from_tensor_model_parallel_region(out)
    return out


def last_word_accuracy(
    module: torch.nn.Module,
    passages: Sequence[EncodedPassage],
    tp_size: int = 1,
    batch_size: int = 16,
    pad_id: int = 0,
) -> dict[str, Any]:
    """``{"accuracy", "n", "word_nll"}`` of ``module`` on ``passages`` (greedy, teacher-forced).

    The model is put in eval mode for the call and restored after it.
    """
    if not passages:
        raise ValueError("last_word_accuracy needs at least one passage")
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    right, nll = 0, 0.0
    try:
        with torch.no_grad():
            for lo in range(0, len(passages), batch_size):
                chunk = passages[lo : lo + batch_size]
                seqs = [list(p.context) + list(p.target[:-1]) for p in chunk]
                width = max(map(len, seqs))
                tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                for i, sq in enumerate(seqs):
                    tokens[i, : len(sq)] = torch.tensor(sq)
                logp = torch.log_softmax(_logits(module, tokens.to(device), tp_size).float(), dim=-1)
                for i, p in enumerate(chunk):
                    at = torch.arange(len(p.context) - 1, len(p.context) - 1 + len(p.target), device=device)
                    want = torch.tensor(p.target, device=device)
                    rows = logp[i, at]
                    right += int(bool((rows.argmax(dim=-1) == want).all()))
                    nll -= float(rows.gather(1, want.unsqueeze(1)).sum())
    finally:
        module.train(was_training)
    return {"accuracy": right / len(passages), "n": len(passages), "word_nll": nll / len(passages)}
