"""scikit-learn's bundled 8x8 digits as trainer datasets (the ViT's data; nothing is downloaded).

``sklearn.datasets.load_digits`` reads a CSV shipped inside scikit-learn (1,797 images, 10 classes,
pixel intensities 0..16). :func:`digits_splits` shuffles them once with a fixed seed and cuts a
validation split; each sample is a dict in the shape :func:`lrscale_megatron.data.get_batch` stacks:

    tokens      [64] int64   the pixels, row-major (values 0..16)
    labels      [64] int64   the class at position 0, zeros elsewhere
    loss_mask   [64] float32 1.0 at position 0 only (the loss is the class cross entropy)
    position_ids[64] int64   0..63 (unused by the ViT; kept for the batch format)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

NUM_PIXELS = 64
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency of the cross-arch extra
        raise ImportError(
            "the ViT's digits need scikit-learn (sklearn.datasets.load_digits, bundled data); "
            "fix: pip install scikit-learn (a dependency of lrscale-megatron)"
        ) from None
    d = load_digits()
    return d.data.astype(np.int64), d.target.astype(np.int64)


class DigitsDataset:
    """Indexable list of digit samples (see the module docstring for the sample format)."""

    def __init__(self, images: np.ndarray, classes: np.ndarray) -> None:
        self.tokens = torch.from_numpy(images).long()
        lab = torch.zeros_like(self.tokens)
        lab[:, 0] = torch.from_numpy(classes)
        self.labels = lab
        self.mask = torch.zeros(self.tokens.shape, dtype=torch.float32)
        self.mask[:, 0] = 1.0
        self.positions = torch.arange(NUM_PIXELS)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens[i],
            "labels": self.labels[i],
            "loss_mask": self.mask[i],
            "position_ids": self.positions,
        }

    def classes(self) -> torch.Tensor:
        return self.labels[:, 0]


@dataclass(frozen=True)
class DigitsSplits:
    train: DigitsDataset
    valid: DigitsDataset


def digits_splits(valid_fraction: float = 0.2, seed: int = 0) -> DigitsSplits:
    """A fixed shuffle (``seed``) of the 1,797 digits cut into train and validation splits."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction}; fix: use a fraction in (0, 1), e.g. 0.2")
    x, y = _load()
    perm = np.random.default_rng(seed).permutation(len(y))
    n_valid = int(round(valid_fraction * len(y)))
    v, t = perm[:n_valid], perm[n_valid:]
    return DigitsSplits(train=DigitsDataset(x[t], y[t]), valid=DigitsDataset(x[v], y[v]))


def accuracy(model: Any, dataset: DigitsDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of a ViT (logits from ``model(tokens)``) on ``dataset``."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            logits = model(dataset.tokens[i : i + batch_size])
            correct += int((logits.argmax(-1) == dataset.classes()[i : i + batch_size]).sum())
    return correct / len(dataset)
