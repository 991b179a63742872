"""A small GPT in plain PyTorch (nanoGPT-shaped): the unsharded reference for the curvature core.

Pre-LayerNorm blocks, causal self-attention (explicit softmax by default so every autograd mode,
including ``torch.func`` forward-mode, works), GELU MLP, tied input/output embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TorchGPTConfig:
    vocab_size: int = 256
    seq_length: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    use_sdpa: bool = False


class _Block(nn.Module):
    def __init__(self, cfg: TorchGPTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, 4 * h)
        self.fc2 = nn.Linear(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        nh = self.cfg.num_heads
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, nh, h // nh).transpose(1, 2) for t in (q, k, v))
        if self.cfg.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(h // nh)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            y = att @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TorchGPT(nn.Module):
    def __init__(self, cfg: TorchGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.seq_length, cfg.hidden_size)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()

    def init_weights(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = (
                        0.02 / math.sqrt(2 * self.cfg.num_layers)
                        if name.endswith(("proj.weight", "fc2.weight"))
                        else 0.02
                    )
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def torch_gpt_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross entropy; ``batch`` has ``tokens`` and ``labels`` of shape [B, S]."""
    logits = model(batch["tokens"])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(
            torch.float64 if logits.dtype == torch.float64 else torch.float32
        ),
        batch["labels"].reshape(-1),
    )
