"""What :mod:`lrscale_megatron.parallel` reads from megatron-core: whether its ``parallel_state`` is
initialised, and where a pipeline stage's transformer layers start in the global numbering."""

from __future__ import annotations

import torch


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of the first transformer layer held by ``model`` (megatron's 1-based layer_number)."""
    for m in model.modules():
        n = getattr(m, "layer_number", None)
        if isinstance(n, int) and hasattr(m, "self_attention"):
            return n - 1
    return 0


def megatron_initialized() -> bool:
    """``True`` when megatron-core is installed and its model-parallel state is initialised."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return False
    return bool(ps.model_parallel_is_initialized())
