"""A causal MLP-Mixer language model in plain PyTorch (the cross-architecture check of the LR law).

Which causal variant, and why: MLP-Mixer (Tolstikhin et al. 2021) mixes tokens with an MLP across the
sequence axis, which sees the future. The best-documented causal form is the one gMLP uses for
autoregressive language modelling (Liu et al. 2021, "Pay Attention to MLPs", Sec. 4: the token-mixing
projection ``W`` is an ``S x S`` matrix whose upper triangle is masked, so position ``i`` only reads
positions ``<= i``). We keep Mixer's block structure (pre-LayerNorm, a residual token-mixing layer, a
residual channel MLP) and use that masked matrix as the token-mixing layer, without gMLP's gating:

    x = x + (tril(W) @ LN(x)) + b        # token mixing: [S, S] lower-triangular, shared by channels
    x = x + W2 GELU(W1 LN(x))            # channel MLP, hidden 4h

Causality is exact: every other operation is per position, and ``tril(W)`` has no path from a later
position to an earlier one (``tests/unit/test_cross_arch_models.py`` changes future tokens and checks
the earlier logits do not move). ``W`` is stored as a full ``[S, S]`` parameter (the masked upper
triangle gets zero gradient and is never read); :func:`mixer_num_params` counts all of it, as the
optimizer sees it. There are no position embeddings: ``W`` is position-specific already.

The call signature is megatron's ``GPTModel`` one (``model(tokens, position_ids, attention_mask,
labels=...)``, per-token loss when labels are given, ``post_process = True``), so
:func:`lrscale_megatron.models.gpt.gpt_loss_fn`, the DeepSpeed engine step of
:mod:`lrscale_megatron.train.loop` and the curvature operators take it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MixerConfig:
    """Shape of a causal Mixer LM. ``ffn_hidden_size`` 0 means 4·hidden."""

    vocab_size: int = 264
    seq_length: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    ffn_hidden_size: int = 0
    tie_embeddings: bool = True

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


def mixer_num_params(cfg: MixerConfig) -> tuple[int, int]:
    """``(total, non_embedding)`` parameter counts; the word embedding (tied output) is the embedding."""
    h, f, s, L = cfg.hidden_size, cfg.ffn, cfg.seq_length, cfg.num_layers
    per_layer = 2 * h + (s * s + s) + 2 * h + (h * f + f) + (f * h + h)
    non_emb = L * per_layer + 2 * h + (0 if cfg.tie_embeddings else cfg.vocab_size * h)
    return non_emb + cfg.vocab_size * h, non_emb


class _MixerBlock(nn.Module):
    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        h, s = cfg.hidden_size, cfg.seq_length
        self.ln1 = nn.LayerNorm(h)
        self.token_mix = nn.Parameter(torch.zeros(s, s))
        self.token_bias = nn.Parameter(torch.zeros(s))
        self.ln2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, h)
        self.causal: torch.Tensor
        self.register_buffer("causal", torch.ones(s, s, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        w = self.token_mix[:s, :s].masked_fill(~self.causal[:s, :s], 0.0)
        mixed = torch.einsum("ij,bjh->bih", w, self.ln1(x)) + self.token_bias[:s, None]
        x = x + mixed
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CausalMixer(nn.Module):
    """Causal MLP-Mixer LM: word embedding, ``num_layers`` Mixer blocks, final LayerNorm, tied output."""

    post_process = True  # the last (only) stage: gpt_loss_fn asks for the per-token loss

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(_MixerBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]``, or the per-token cross entropy ``[B, S]`` when ``labels`` are given
        (``position_ids`` / ``attention_mask`` are accepted for megatron's signature and not needed)."""
        if tokens.shape[1] > self.cfg.seq_length:
            raise ValueError(
                f"tokens have {tokens.shape[1]} positions > model seq_length={self.cfg.seq_length}; "
                "fix: shorten the batch or build the model with a longer seq_length"
            )
        x = self.wte(tokens)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.t() if self.lm_head is None else self.lm_head(x)
        if labels is None:
            return logits
        ce_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).to(ce_dtype), labels.reshape(-1), reduction="none"
        ).view_as(labels)

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2-style init from one seeded generator: N(0, 0.02) matrices (residual outputs scaled by
        ``1/sqrt(2L)``), zero biases, unit norms; the token-mixing matrix too is N(0, 0.02) (near zero, as
        gMLP initialises its token-mixing projection)."""
        g = torch.Generator().manual_seed(seed)
        L = self.cfg.num_layers
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("bias", "token_bias")):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith("fc2.weight") else 0.02
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
