"""Refuse finite-difference products of a loss evaluated under low-precision autocast.

A finite-difference product evaluates the gradient at ``theta + h v`` with a step of about
``1e-4 * ||theta||`` in float32 (``0.1 * sqrt(u)``; a quarter of it for the preconditioned operator). When
the user's ``loss_fn`` runs the model under ``torch.autocast(dtype=torch.bfloat16)`` (or float16, or
Transformer Engine's FP8 autocast), every matmul casts the perturbed float32 weights down to 8 (or 11, or
3) mantissa bits first, and most of ``h v`` rounds away there: the "product" is round-off. Measured on the
834k-parameter TorchGPT with float32 parameters: bfloat16 autocast, fd lambda 123.8 (not converged) for an
exact 42.3; float16 autocast, 42.96 refused by the true-residual check. The solver's checks catch it there,
but only by a margin the user cannot control, and the reason they give does not name the setting.

:func:`refuse_low_precision_autocast` looks, during every fd evaluation, at the autocast state in force
when any module's forward starts (a global forward pre-hook, removed on exit: the user's own
``torch.autocast`` blocks inside ``loss_fn`` are what it must see) and raises :class:`AutocastRefused`
naming the device, the dtype and the fixes: ``mode="exact"`` (double backward has no step to lose), a
``loss_fn`` for the measurement without autocast, or bfloat16/float16 *parameters* (the operator then
evaluates the loss at float32 copies on its own). Autocast to float32 / float64, or disabled, passes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

#: autocast dtypes whose rounding swallows a float32 finite-difference step
LOW_PRECISION_AUTOCAST = (torch.bfloat16, torch.float16)
#: device types whose autocast state is looked at
DEVICE_TYPES = ("cuda", "cpu")

REFUSAL = (
    "HessianOperator(mode='fd'): loss_fn runs the model under {what}. Finite differences perturb the "
    "parameters by ~1e-4 of their norm, and the low-precision matmuls round most of that perturbation "
    "away, so the products would be round-off (a wrong or unconverged lambda_max). Use mode='exact' "
    "(double backward has no step to lose), or give the measurement a loss_fn without autocast (float32 "
    "evaluation), or train with bfloat16/float16 parameters instead of autocast (the operator then "
    "evaluates the loss at float32 copies itself)."
)


class AutocastRefused(ValueError):
    """A finite-difference product was asked for a loss evaluated under low-precision autocast."""


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or ``None`` when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


#: one call for every device type (torch >= 2.4), looked up once
_ANY_ON = getattr(torch._C, "_is_any_autocast_enabled", None)
#: Transformer Engine's FP8 module (looked up in ``sys.modules``: only when TE is already imported)
_TE_FP8 = "transformer_engine.pytorch.fp8"


def _any_autocast() -> bool:
    if _ANY_ON is not None:
        return bool(_ANY_ON())
    try:
        return any(torch.is_autocast_enabled(dev) for dev in DEVICE_TYPES)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _fp8_autocast() -> bool:
    """Whether Transformer Engine's FP8 autocast is on (only when TE is already imported)."""
    te_fp8 = sys.modules.get(_TE_FP8)
    manager = getattr(te_fp8, "FP8GlobalStateManager", None)
    is_on = getattr(manager, "is_fp8_enabled", None)
    return bool(is_on()) if callable(is_on) else False


def low_precision_autocast() -> str | None:
    """A description of the low-precision autocast in force now, or ``None``."""
    if _TE_FP8 not in sys.modules and not _any_autocast():
        return None  # the common case: ~1 us
    for dev in DEVICE_TYPES:
        dt = _autocast_dtype(dev)
        if dt in LOW_PRECISION_AUTOCAST:
            return f"torch.autocast(device_type={dev!r}, dtype={dt})"
    if _fp8_autocast():
        return "Transformer Engine's fp8_autocast"
    return None


@contextlib.contextmanager
def refuse_low_precision_autocast() -> Iterator[None]:
    """Within the block, raise :class:`AutocastRefused` when a module's forward starts under
    low-precision autocast (module docstring). The outer state is checked on entry too."""

    modules, any_on = sys.modules, _ANY_ON

    def hook(module: torch.nn.Module, args: object) -> None:
        # every module's forward (~1 us, against milliseconds of a forward): the common case, no
        # autocast on any device and no Transformer Engine, without a further call
        if any_on is not None and not any_on() and _TE_FP8 not in modules:
            return
        what = low_precision_autocast()
        if what is not None:
            raise AutocastRefused(REFUSAL.format(what=what))

    outer = low_precision_autocast()
    if outer is not None:
        raise AutocastRefused(REFUSAL.format(what=outer))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
