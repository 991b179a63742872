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


def all_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model.modules()`` (each once, ``model`` first), walked without its per-module
    generator frames and name strings (half the time: ~20 us on a 33-module GPT, every evaluation)."""
    out: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack: list[Any] = [model]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # ``_modules`` may hold ``None``; a shared submodule once
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed(m._modules.values()))
    return out


_SEEDED: list[torch.Tensor] = []


def _seeded_cpu_state() -> torch.Tensor:
    """The CPU generator's whole state right after ``manual_seed(MEASUREMENT_SEED)`` (taken once)."""
    if not _SEEDED:
        _SEEDED.append(torch.Generator().manual_seed(MEASUREMENT_SEED).get_state())
    return _SEEDED[0]


@contextlib.contextmanager
def deterministic_loss(model: torch.nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Dropout off (``eval_mode``) and the random generators fixed for one evaluation (module docstring)."""
    # the flags are set bypassing ``nn.Module.__setattr__`` (~10 us a call, ~1 ms an evaluation on a
    # small GPT); ``Module.train`` sets the same plain attribute. The modules are walked at every
    # evaluation (a module ``loss_fn`` created since the last one is switched too).
    flags = [(m, m.training) for m in all_modules(model)]
    devices = []
    if torch.cuda.is_initialized() and torch.cuda.is_available():  # the cheap test first (~0.04 us)
        devices = [torch.cuda.current_device()]
    # the generators' states saved and restored directly (what ``torch.random.fork_rng(devices)`` does,
    # without its per-call device-module lookups); ``torch.manual_seed`` would also queue lazy seeds for
    # every uninitialised backend (~1.6 ms per evaluation), so only these generators are seeded
    cpu_state = torch.default_generator.get_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    try:
        if eval_mode:
            for m, f in flags:
                if f:
                    object.__setattr__(m, "training", False)
        torch.default_generator.set_state(_seeded_cpu_state())  # = manual_seed(MEASUREMENT_SEED), 1 us less
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(MEASUREMENT_SEED)
        yield
    finally:
        torch.default_generator.set_state(cpu_state)
        for d, st in zip(devices, cuda_states):
            torch.cuda.set_rng_state(st, d)
        for m, f in flags:
            if m.training != f:
                object.__setattr__(m, "training", f)


#: the scaled-dot-product-attention backends' flags (``torch.nn.attention._backend_names``)
_SDP_FLAGS = ("cudnn", "flash", "mem_efficient", "math", "overrideable")


def _sdp_flag_functions() -> list[tuple[Any, Any, bool]] | None:
    try:
        return [
            (getattr(torch._C, f"_get_{n}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{n}"), n == "math")
            for n in _SDP_FLAGS
        ]
    except AttributeError:  # another torch: the public context manager below
        return None


_SDP = _sdp_flag_functions()


@contextlib.contextmanager
def math_sdpa() -> Iterator[None]:
    """Scaled-dot-product attention with the math kernel only within the block, the previous flags
    restored after: ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` with its five flags read and set
    directly (~3 us instead of ~15 us, every evaluation)."""
    if _SDP is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
        return
    before = [get() for get, _, _ in _SDP]
    try:
        for _, set_, on in _SDP:
            set_(on)
        yield
    finally:
        for (_, set_, _), was in zip(_SDP, before):
            set_(was)


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
