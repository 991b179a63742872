"""Checkpoints that resume exactly: model, optimizer (ZeRO partitions included), scheduler, data position, RNG.

Layout of ``<dir>/step<N>/``: DeepSpeed's own files (``engine.save_checkpoint``: model shards named per
(tp, pp) rank, optimizer / ZeRO partitions, ``lr_scheduler`` state, and our ``client_state``: the step,
the per-step history and the cumulative wall time) plus ``rng_rank<R>.pt`` per global rank (Python,
NumPy, torch CPU/CUDA generators and megatron's model-parallel RNG tracker). ``<dir>/latest`` names the
newest tag (written by DeepSpeed).

The data position is the step itself: batches are a pure function of ``(step, dp rank)``
(:func:`lrscale_megatron.data.get_batch`), so a resumed run reads exactly the batches the uninterrupted
run would have. Resuming needs the same layout (tp, pp, dp) as the save.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as mrandom

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = mrandom.get_cuda_rng_tracker()
    state["megatron_tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mrandom.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def save(engine: Any, directory: str | Path, step: int, client_state: dict[str, Any]) -> Path:
    """Write ``<directory>/step<step>`` on every rank (collective)."""
    import torch.distributed as dist

    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    path = Path(directory) / tag
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    logger.info("checkpoint saved: %s", path)
    return path


def resolve(path: str | Path) -> tuple[Path, str]:
    """``(directory, tag)`` of a checkpoint given as ``<dir>/step<N>`` or as a ``<dir>`` with ``latest``."""
    p = Path(path)
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if p.is_dir() and p.parent.is_dir():
        return p.parent, p.name
    raise FileNotFoundError(
        f"checkpoint.load={str(path)!r}: neither a checkpoint directory (<dir>/step<N>) nor a directory "
        "with a 'latest' file. Fix: point it at a directory written by checkpoint.dir"
    )


def load(engine: Any, path: str | Path) -> dict[str, Any]:
    """Restore engine state and this rank's RNG; returns the ``client_state`` saved with it."""
    import torch.distributed as dist

    directory, tag = resolve(path)
    rng_file = directory / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes or another layout. "
            "Fix: resume with the same tp, pp and dp as the saving run"
        )
    loaded, client = engine.load_checkpoint(
        str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {directory}/{tag}")
    set_rng_state(torch.load(rng_file, weights_only=False))
    logger.info("resumed from %s/%s at step %s", directory, tag, client.get("step"))
    return dict(client)
