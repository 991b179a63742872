"""Rank-aware logging: library code logs through ``logging``; only rank 0 prints INFO by default."""

from __future__ import annotations

import logging
import os


def rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        r = rank()
        record.rank = r  # type: ignore[attr-defined]
        return record.levelno >= logging.WARNING or r == 0


def setup_logging(level: int | str = "INFO") -> None:
    """Configure the ``lrscale_megatron`` logger for a job: rank-prefixed lines, INFO on rank 0 only."""
    root = logging.getLogger("lrscale_megatron")
    if any(getattr(h, "_lrscale", False) for h in root.handlers):
        root.setLevel(level)
        return
    h = logging.StreamHandler()
    h._lrscale = True  # type: ignore[attr-defined]
    h.addFilter(_RankFilter())
    h.setFormatter(logging.Formatter("[%(asctime)s r%(rank)s %(name)s] %(message)s", "%H:%M:%S"))
    root.addHandler(h)
    root.setLevel(level)
