"""Which solves are in progress, and the fd anchors left dirty inside them (lazy restore, :mod:`.anchor`).

Torch-free (the solvers also run on JAX vectors): the anchors register themselves here when a product
leaves the parameters at ``theta0 + h v`` and leave when ``theta0`` is back; anything that must see
``theta0`` calls :func:`settle_all`. Single-threaded: one solve stack per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


class Settles(Protocol):
    def settle(self) -> None: ...


#: anchors whose parameters hold ``theta0 + h v`` now, by ``id``
DIRTY: dict[int, Settles] = {}
_SOLVES = [0]


def in_solve() -> bool:
    """Whether a solve is in progress (fd products then restore lazily)."""
    return _SOLVES[0] > 0


def settle_all(keep: Any = None) -> None:
    """Put ``theta0`` back under every dirty anchor (but ``keep``)."""
    for a in list(DIRTY.values()):
        if a is not keep:
            a.settle()


@contextlib.contextmanager
def solve_scope() -> Iterator[None]:
    """A solve: fd products inside it restore lazily; every dirty anchor is settled when it ends, returned
    or raised."""
    _SOLVES[0] += 1
    try:
        yield
    finally:
        _SOLVES[0] -= 1
        settle_all()


@contextlib.contextmanager
def outside_solves() -> Iterator[None]:
    """User code called by a solver (its ``callback``): every dirty anchor settled first, and fd products
    run inside it restore eagerly (a solve started inside it is a solve of its own)."""
    settle_all()
    saved, _SOLVES[0] = _SOLVES[0], 0
    try:
        yield
    finally:
        _SOLVES[0] = saved
