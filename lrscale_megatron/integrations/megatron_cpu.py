"""CPU shims for megatron-core 0.16.x: for the tests and the CPU presets only.

megatron-core assumes CUDA in a few places that matter on a CPU/gloo machine:

1. ``torch.cuda.current_device()`` is used as the device of 20+ buffers -> returns ``"cpu"``;
   ``torch.cuda.synchronize`` -> no-op.
2. ``CudaRNGStatesTracker`` forks CUDA RNG states -> a tracker that forks the CPU generator.
3. Pipeline schedules build tensors with ``device="cuda"`` -> :class:`CudaToCpuMode`, a
   ``TorchFunctionMode`` used as a context manager around the schedule call.

:func:`enable` is opt-in, idempotent and reversible (:func:`disable`); it refuses to run where CUDA is
available (the shims would hide real devices). Nothing here is applied on a GPU cluster.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_originals: dict[str, Any] = {}


def enable(seed: int = 1234) -> None:
    """Install the shims (idempotent) and (re)seed megatron's model-parallel RNG tracker on CPU."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron CPU shims must not be enabled on a machine with CUDA devices")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not _originals:
        _originals["current_device"] = torch.cuda.current_device
        _originals["synchronize"] = torch.cuda.synchronize
        _originals["tracker"] = mrandom._CUDA_RNG_STATE_TRACKER
        _originals["tracker_init"] = mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        logger.debug("megatron CPU shims enabled")

    tracker = CpuRNGStatesTracker()
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def disable() -> None:
    """Restore what :func:`enable` replaced (idempotent)."""
    if not _originals:
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = _originals["current_device"]
    torch.cuda.synchronize = _originals["synchronize"]
    mrandom._CUDA_RNG_STATE_TRACKER = _originals["tracker"]
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = _originals["tracker_init"]
    _originals.clear()


def is_enabled() -> bool:
    return bool(_originals)


def _make_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class _CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker API over the CPU generator."""

        def add(self, name, seed):
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return _CpuRNGStatesTracker


def CpuRNGStatesTracker():  # noqa: N802 - reads like the class it builds
    return _make_tracker_class()()


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in factory calls and makes ``Tensor.cuda()`` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)
