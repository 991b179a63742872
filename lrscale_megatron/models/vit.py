"""A small Vision Transformer (Dosovitskiy et al. 2021) in plain PyTorch, for scikit-learn's digits.

Data (:mod:`lrscale_megatron.data.digits`): the 1,797 8x8 handwritten digits bundled inside
scikit-learn (``sklearn.datasets.load_digits``; no download, pixel intensities are integers 0..16).
Why these: they ship with an installed package, so training and the tests run offline; at 8x8 they are
small enough for a CPU ladder of many runs. Each image reaches the model as 64 integer "tokens" (its
pixels, row-major), so the trainer's batch plumbing (``tokens``, ``labels``, ``loss_mask``) is the
language models' unchanged; ``labels[:, 0]`` is the class and ``loss_mask`` is 1 only there.

Preprocessing inside the model: pixels / 16, bilinear upsampling to ``image_size`` (default 16x16), then
non-overlapping ``patch_size`` patches (default 4: 16 patches of 16 pixels). Why upsample: it gives the
usual ViT patch geometry (4x4 patches, a 4x4 patch grid) rather than 2x2-pixel patches, at a cost that
is negligible here; it adds no information. Then: linear patch embedding, learned position embeddings,
pre-LayerNorm transformer blocks (non-causal attention, explicit softmax so every autograd mode,
including forward-over-reverse, works), final LayerNorm, global average pooling over the patches and a
zero-initialised linear head: the "simple ViT" of Beyer et al. 2022 ("Better plain ViT baselines for
ImageNet-1k"), which trains faster than a class token on small data (measured here, width 128, 80 steps
at LR 3e-3: validation loss 2.14 with a class token, 1.81 with pooling; ln 10 = 2.30 is chance).

Megatron's ``GPTModel`` call signature (``post_process = True``, per-position loss when ``labels`` are
given) lets :func:`lrscale_megatron.models.gpt.gpt_loss_fn` and the trainer's DeepSpeed step drive it:
the per-position loss is the class cross entropy at position 0 and zero elsewhere, so the masked mean is
the mean cross entropy over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DIGITS_SIDE = 8
DIGITS_LEVELS = 16  # load_digits pixel values are integers 0..16


@dataclass(frozen=True)
class ViTConfig:
    """Shape of the ViT. ``ffn_hidden_size`` 0 means 4·hidden."""

    num_classes: int = 10
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 16
    patch_size: int = 4
    ffn_hidden_size: int = 0

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                "fix: use e.g. image_size 16 with patch_size 4"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViTConfig.num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                "fix: pick a head count that divides hidden_size"
            )


def vit_num_params(cfg: ViTConfig) -> tuple[int, int]:
    """``(total, non_embedding)``: the patch embedding and position embeddings are the
    embedding (as GPT's word and position embeddings are); blocks, final norm and head are not."""
    h, f, L, p = cfg.hidden_size, cfg.ffn, cfg.num_layers, cfg.patch_size
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    non_emb = L * per_layer + 2 * h + (h * cfg.num_classes + cfg.num_classes)
    emb = (p * p * h + h) + cfg.num_patches * h
    return non_emb + emb, non_emb


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        nh = self.num_heads
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (t.view(b, s, nh, h // nh).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(h // nh)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """ViT classifier over 8x8 digits given as 64 integer pixel tokens ``[B, 64]`` (values 0..16)."""

    post_process = True

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.patch_size**2, h)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, h))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(h)
        self.head = nn.Linear(h, cfg.num_classes)

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 64]`` pixel ints -> ``[B, num_patches, patch_size**2]`` floats in [0, 1] (upsampled)."""
        if tokens.shape[1] != DIGITS_SIDE * DIGITS_SIDE:
            raise ValueError(
                f"ViT expects {DIGITS_SIDE * DIGITS_SIDE} pixel tokens per image, got {tokens.shape[1]}; "
                "fix: feed 8x8 digits flattened row-major (lrscale_megatron.data.digits)"
            )
        dtype = self.patch_embed.weight.dtype
        img = (tokens.to(dtype) / DIGITS_LEVELS).view(-1, 1, DIGITS_SIDE, DIGITS_SIDE)
        s, p = self.cfg.image_size, self.cfg.patch_size
        if s != DIGITS_SIDE:
            img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False)
        g = s // p
        return img.view(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[B, C]``, or with ``labels`` (``[B, 64]``, class at column 0) the
        per-position loss ``[B, 64]``: the cross entropy at column 0, zeros elsewhere."""
        x = self.patch_embed(self.patches(tokens)) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x).mean(dim=1))
        if labels is None:
            return logits
        ce_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce = F.cross_entropy(logits.to(ce_dtype), labels[:, 0], reduction="none")
        out = torch.zeros(labels.shape, dtype=ce.dtype, device=ce.device)
        return out.index_copy(1, torch.zeros(1, dtype=torch.long, device=ce.device), ce[:, None])

    def init_weights(self, seed: int = 0) -> None:
        """N(0, 0.02) matrices and embeddings (residual outputs scaled by ``1/sqrt(2L)``), zero biases and
        head, unit norms; one seeded generator."""
        g = torch.Generator().manual_seed(seed)
        L = self.cfg.num_layers
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or name.startswith("head."):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
