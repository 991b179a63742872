"""A vector norm a solver already knows, handed to the fd product's step size without a pass.

The finite-difference step ``h = c max(1, ||theta||) / ||v||`` needs ``||v||``: a pass over the
vector and a reduction (an all-reduce under model parallelism) per product. Lanczos hands its operator
unit vectors it has just normalised by a finite ``beta > 0`` (so they are finite too): it
:func:`remember` s that norm, and :func:`recall` gives it back for that very vector, unchanged since:
the same list of the same tensor objects (held by weak reference: a freed tensor never matches a new
one at the same address) at the same ``_version`` (an in-place change misses). Anything else (a
preconditioned or projected vector, a user's vector, a NaN one) misses and is measured as before, so
a non-finite vector still gives a NaN product that the solver reports. One vector is remembered at a
time. No torch import: the solver stays backend-neutral; arrays without a ``_version`` (JAX) are never
remembered.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

_LAST: list[tuple[list[Any], list[int], float] | None] = [None]


def remember(v: Sequence[Any], norm: float) -> None:
    """``v`` (a list of tensors) has norm ``norm`` (finite, positive: the caller checked) now."""
    try:
        refs = [weakref.ref(t) for t in v]
        versions = [int(t._version) for t in v]
    except (TypeError, AttributeError):  # not torch tensors
        _LAST[0] = None
        return
    _LAST[0] = (refs, versions, float(norm))


def recall(v: Sequence[Any]) -> float | None:
    """The norm remembered for exactly these tensors at these versions, else ``None``."""
    m = _LAST[0]
    if m is None or len(m[0]) != len(v):
        return None
    for r, ver, t in zip(m[0], m[1], v):
        if r() is not t or t._version != ver:
            return None
    return m[2]


def forget() -> None:
    _LAST[0] = None
