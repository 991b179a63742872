"""How the loss is evaluated for a curvature measurement: deterministic, and at substituted parameters.

* **Deterministic loss** (:func:`deterministic_loss`). A Hessian-vector product compares gradients
  (finite differences) or differentiates one gradient (exact); with dropout in ``train()`` mode each
  evaluation draws other masks and the "product" is noise (fd lambda 2,210 against 0.595). During every
  evaluation the model is put in ``eval()`` mode (dropout off: the Hessian of the loss without dropout)
  and the CPU and CUDA random generators are forked and seeded with the same value, so any randomness
  left (a functional dropout called with ``training=True``) is identical in every evaluation. The
  modules' ``training`` flags and the generators' states are restored afterwards, so the training run's
  random stream is not disturbed. Caveat: ``eval()`` also switches BatchNorm to running statistics.
* **Substituted parameters** (:func:`substituted`): the loss at ``theta + h v`` or at float32
  copies of bfloat16/float16 parameters is evaluated on tensors the operator owns, swapped in the way
  ``torch.func.functional_call`` does, never by writing into the model's parameters (no copy kept for restoring, no version
  bump, hooks registered on the parameters untouched).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: seed of the generators during every evaluation of the measured loss
MEASUREMENT_SEED = 1234


@contextlib.contextmanager
def deterministic_loss(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Dropout off (``eval_mode``) and the random generators fixed for one evaluation (module docstring)."""
    # the flags are set bypassing ``nn.Module.__setattr__`` (~10 us a call, ~1 ms an evaluation on a
    # small GPT); ``Module.train`` sets the same plain attribute
    flags = [(m, m.training) for m in model.modules()]
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = [torch.cuda.current_device()]
    try:
        if eval_mode:
            for m, f in flags:
                if f:
                    object.__setattr__(m, "training", False)
        with torch.random.fork_rng(devices=devices):
            # the generators fork_rng saved and restores (torch.manual_seed would also queue lazy seeds
            # for every uninitialised backend, ~1.6 ms per evaluation)
            torch.default_generator.manual_seed(MEASUREMENT_SEED)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(MEASUREMENT_SEED)
            yield
    finally:
        for m, f in flags:
            if m.training != f:
                object.__setattr__(m, "training", f)


@contextlib.contextmanager
def substituted(model: torch.nn.Module, pdict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s parameters/buffers named in ``pdict`` are those tensors (the
    mechanism of ``torch.func.functional_call``; tied parameters follow), whatever path ``loss_fn``
    takes to reach them (``model.module``, submodules, ``shared_embedding_or_output_weight()``)."""
    if not pdict:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(model, pdict, tie_weights=True):
        yield


LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast_rest(model: torch.nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """float32 copies (no grad) of the low-precision parameters and buffers not in ``skip``, so that a
    model evaluated with float32 substitutes for some parameters runs wholly in float32."""
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if n not in skip and p.dtype in LOW_PRECISION:
            out[n] = p.detach().float()
    for n, b in model.named_buffers():
        if n not in skip and b.dtype in LOW_PRECISION:
            out[n] = b.float()
    return out


def megatron_set_input(model: torch.nn.Module, inp: torch.Tensor | None) -> None:
    m: Any = model
    while not hasattr(m, "set_input_tensor") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "set_input_tensor"):
        raise ValueError(
            "pipeline-parallel HessianOperator needs model.set_input_tensor (megatron) or "
            "an input_setter=fn(model, tensor)"
        )
    m.set_input_tensor(inp)
