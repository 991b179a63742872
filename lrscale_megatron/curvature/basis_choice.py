"""Where a Lanczos solve keeps its basis, and what the solve lends its operator for its duration.

* :func:`resolve_basis`: the ``basis`` / ``reorth`` arguments checked and resolved (``"auto"`` for ``k=1``
  means the host basis when it fits, else the second pass).
* :func:`host_basis`: the vector backend's host-kept basis within its budget (on every rank), or why not,
  logged at INFO; ``basis="host"`` asked for and not possible is refused.
* :func:`solve_scoped`: what the solve lends its operator (the fd anchor, :mod:`.anchor`) is taken back
  when the solve ends, also on an exception; inside the solve fd products restore lazily
  (:func:`~lrscale_megatron.curvature.solve_scope.solve_scope`), and the parameters are put back before a
  user ``callback`` runs; the start vector is handed over, not kept in the wrapper.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar, cast

from lrscale_megatron.curvature import norm_hint
from lrscale_megatron.curvature.results import EigenResult, LinearOperator
from lrscale_megatron.curvature.solve_scope import outside_solves, solve_scope
from lrscale_megatron.curvature.vectors import OffDeviceBasis, Vector

logger = logging.getLogger("lrscale_megatron.curvature.lanczos_solver")  # the solver's log, as before

_REORTH = ("full", "none")
_BASIS = ("auto", "keep", "recompute", "host")


def resolve_basis(basis: str, reorth: str | None, k: int) -> tuple[str, str]:
    """``(mode, reorth)``; mode ``"auto1"`` means: the host basis if it fits, else ``"recompute"``."""
    if basis not in _BASIS:
        raise ValueError(f"basis={basis!r} is not supported; use one of {_BASIS}")
    if reorth is not None and reorth not in _REORTH:
        raise ValueError(f"reorth={reorth!r} is not supported; use one of {_REORTH}")
    if basis == "auto":
        basis = "auto1" if k == 1 and reorth != "full" else "keep"
    if basis in ("recompute", "host", "auto1"):
        if k != 1:
            raise ValueError(f"basis={basis!r} supports k=1 only (got k={k}); use basis='keep' for k > 1")
        if reorth == "full":
            raise ValueError(
                f"basis={basis!r} does not reorthogonalise (no basis on the device); use reorth='none' "
                "or basis='keep'"
            )
        return basis, "none"
    return basis, reorth or "full"


def host_basis(be: object, basis: str, n_vectors: int) -> tuple[OffDeviceBasis | None, str]:
    """The host basis for ``basis`` in ``("host", "auto1")``, or ``(None, why not)``."""
    make = getattr(be, "host_basis", None)
    if make is None:
        hb, why = None, f"the vector backend {type(be).__name__} keeps no host basis"
    else:
        hb, why = make(n_vectors)
    if hb is None and basis == "host":
        raise ValueError(
            f"basis='host' is not possible: {why}. Use basis='recompute' (second pass, no stored basis) "
            "or basis='auto' (chooses)"
        )
    if hb is None:
        logger.info("lanczos: basis='recompute' (second pass): no host basis: %s", why)
    else:
        logger.info("lanczos: basis='host' (Lanczos vectors in host memory, no second pass): %s", why)
    return hb, why


_Solver = TypeVar("_Solver", bound=Callable[..., EigenResult])


def _settled(callback: Callable[..., object]) -> Callable[..., object]:
    """``callback`` called with every fd anchor settled: the parameters at ``theta0`` (:mod:`.anchor`)."""

    @functools.wraps(callback)
    def call(*a, **k):
        with outside_solves():  # settled, and products the callback runs itself restore eagerly
            return callback(*a, **k)

    return call


class StartHandoff:
    """A start vector passed through :func:`_solve_scoped`'s frame, which keeps its arguments for the
    whole solve: the solver takes the vector out, so once it has normalised it, nothing holds it (one
    device vector less for the host and kept bases)."""

    def __init__(self, v: Vector | None) -> None:
        self._v = [v]

    def take(self) -> Vector | None:
        return self._v.pop() if self._v else None


def solve_scoped(solver: _Solver) -> _Solver:
    """What a solve lends its operator (the fd anchor: ``op.allow_anchor()``, :mod:`.anchor`) is taken
    back when the solve ends, also on an exception: a copy of the parameters must never outlive the solve
    it was taken for (after an optimizer step, writing it back would revert training). The solve runs in
    :func:`~lrscale_megatron.curvature.solve_scope.solve_scope` (fd products leave ``theta0 + h v`` in place
    between products; every anchor is settled when it ends), a ``callback`` is called with the
    parameters settled, and the remembered Lanczos norm (:mod:`.norm_hint`) is forgotten."""

    sig = inspect.signature(solver)

    @functools.wraps(solver)
    def solve(op: LinearOperator, *args, **kwargs) -> EigenResult:
        if "v0" in kwargs:  # this frame must not keep the start vector alive during the solve
            kwargs["v0"] = StartHandoff(kwargs["v0"])
        if args or kwargs.get("callback") is not None:  # a user callback sees theta0, never theta0 + h v
            bound = sig.bind(op, *args, **kwargs)
            callback = bound.arguments.get("callback")
            if callback is not None:
                bound.arguments["callback"] = _settled(callback)
                args, kwargs = bound.args[1:], bound.kwargs
        try:
            with solve_scope():  # fd products restore lazily inside; all settled when it ends or raises
                return solver(op, *args, **kwargs)
        finally:
            drop = getattr(op, "drop_anchor", None)
            if drop is not None:
                drop()
            norm_hint.forget()

    return cast(_Solver, solve)
