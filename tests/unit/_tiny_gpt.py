"""The tiny TorchGPT most curvature unit tests run on: vocabulary 64, 16 tokens, 2 layers of width 32,
4 heads, initialised with seed 0, and one batch of 4 sequences (tokens and next-token labels)."""

from __future__ import annotations

import torch

from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def tiny_gpt(dtype: torch.dtype = torch.float32) -> tuple[TorchGPT, dict[str, torch.Tensor]]:
    """The model (initialised in float32, then cast to ``dtype``) and its batch."""
    model = TorchGPT(TorchGPTConfig(vocab_size=64, seq_length=16, hidden_size=32, num_layers=2, num_heads=4))
    model.init_weights(0)
    model = model.to(dtype)
    tok = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def tiny_loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross entropy, in float32 whatever the model's dtype."""
    return torch_gpt_loss(m, b).float()
