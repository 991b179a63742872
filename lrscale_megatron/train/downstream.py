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

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lrscale_megatron.data import lambada
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


def _rules_digest() -> str:
    """A digest of the passage rules' source: a cached draw is reused only while the rules are unchanged."""
    return hashlib.sha256(Path(lambada.__file__).read_bytes()).hexdigest()[:16]


def _cache_path(prepared: Any, source: str, n: int, seq_length: int) -> Path | None:
    directory = getattr(prepared, "directory", None)
    return None if directory is None else Path(directory) / f"lambada-{source}-n{n}-s{seq_length}.json"


def _read_cache(path: Path | None, key: dict[str, Any]) -> tuple[list[EncodedPassage], str] | None:
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        passages = [EncodedPassage(context=tuple(c), target=tuple(t)) for c, t in saved["passages"]]
        return passages, str(saved["name"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # a torn or foreign file: draw again
        logger.debug("ignoring the last-word cache %s: %s", path, err)
        return None


def _write_cache(path: Path | None, key: dict[str, Any], passages: list[EncodedPassage], name: str) -> None:
    if path is None:
        return
    body = {"key": key, "name": name, "passages": [[list(p.context), list(p.target)] for p in passages]}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)  # atomic: ranks writing the same draw at once never tear it
    except OSError as err:  # a read-only cache directory costs the next run a redraw, nothing else
        logger.debug("could not cache the last-word passages at %s: %s", path, err)
        tmp.unlink(missing_ok=True)


def held_out_passages(
    prepared: Any, source: str, n: int, seq_length: int, byte_level: bool
) -> tuple[list[EncodedPassage], str]:
    """``n`` encoded passages for a run of ``seq_length`` tokens, and where they come from.

    The draw is cached next to the prepared corpus (``lambada-<source>-n<n>-s<seq_length>.json``),
    keyed by the corpus request, the held-out document names, the tokenizer and a digest of the passage
    rules, so only the first run of a sweep or comparison reads the raw corpus (about 3 s on the
    shipped Shakespeare); a key that differs, or a torn file, is drawn again.
    """
    manifest = getattr(prepared, "manifest", {})
    key = {
        "request": manifest.get("request"),
        "valid_documents": manifest.get("valid_documents"),
        "source": source,
        "n": n,
        "seq_length": seq_length,
        "byte_level": byte_level,
        "tokenizer": type(prepared.tokenizer).__name__,
        "vocab_size": getattr(prepared.tokenizer, "vocab_size", None),
        "rules": _rules_digest(),
    }
    path = _cache_path(prepared, source, n, seq_length)
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    texts, name = held_out_texts(prepared, source)
    # about one character per byte token, ~4 per BPE token; the encoder cuts what does not fit
    chars = max(32, seq_length - 16) if byte_level else 3 * seq_length
    passages = encode_passages(build_passages(texts, n, context_chars=chars), prepared.tokenizer, seq_length)
    if not passages:
        raise ValueError(
            f"no LAMBADA-style passage fits seq_length={seq_length} in {name}; "
            "set data.lambada_passages to 0 or use a longer model.seq_length"
        )
    _write_cache(path, key, passages, name)
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
