"""Throughput, MFU, energy and the metrics files (CSV always; TensorBoard when importable).

MFU follows Chowdhery et al. 2022 (PaLM, App. B) without the attention term: a training step costs
``6 * N`` FLOPs per token (N = all parameters), so ``MFU = 6 * N * tokens_per_s / (peak_flops * devices)``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CSV_FIELDS = ("step", "tokens", "wall_s", "train_loss", "lr", "val_loss", "lambda_max", "tokens_per_s", "mfu")


def mfu(
    num_params: int, tokens_per_s: float, peak_flops_per_device: float | None, devices: int
) -> float | None:
    """Model FLOPs utilisation, ``None`` when the device peak is unknown."""
    if not peak_flops_per_device or tokens_per_s <= 0:
        return None
    return 6.0 * num_params * tokens_per_s / (peak_flops_per_device * devices)


class MetricsWriter:
    """Rank 0 writes ``metrics.csv`` (and TensorBoard scalars) under ``output_dir``; other ranks no-op."""

    def __init__(self, output_dir: str | Path | None, enabled: bool, resume: bool = False) -> None:
        self.enabled = enabled and output_dir is not None
        self._tb: Any = None
        self._file: Any = None
        if not self.enabled:
            return
        out = Path(str(output_dir))
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.csv"
        append = resume and path.is_file()
        self._file = path.open("a" if append else "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if not append:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", path)
        else:
            self._tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
