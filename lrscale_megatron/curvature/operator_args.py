"""The argument checks of :class:`~lrscale_megatron.curvature.operators.HessianOperator`."""

from __future__ import annotations

import math
from typing import Any

MODES = ("exact", "fd", "jvp")
FD_SCHEMES = ("forward", "central")
FD_RESTORE = ("auto", "subtract", "copy")


def check_args(
    mode: str, fd_scheme: str, fd_eps: float | None, fd_restore: str, grad_fn: Any, batch_split: int = 1
) -> None:
    """Raise ``ValueError`` naming the argument, its value and what it may be."""
    for name, value, allowed in (("mode", mode, MODES), ("fd_scheme", fd_scheme, FD_SCHEMES)):
        if value not in allowed:
            raise ValueError(f"HessianOperator {name}={value!r} is not one of {allowed}")
    if fd_eps is not None and not (fd_eps > 0 and math.isfinite(fd_eps)):
        raise ValueError(f"HessianOperator fd_eps={fd_eps!r} must be a positive finite number")
    if fd_restore not in FD_RESTORE:
        raise ValueError(f"HessianOperator fd_restore={fd_restore!r} is not one of {FD_RESTORE}")
    if grad_fn is not None and mode != "fd":
        raise ValueError(f"grad_fn is only used with mode='fd' (got mode={mode!r})")
    if grad_fn is not None and batch_split != 1:
        raise ValueError(
            f"HessianOperator batch_split={batch_split} with a grad_fn: the grad_fn evaluates its own batch; "
            "pass batch_split=1, or grad_fn=None"
        )
