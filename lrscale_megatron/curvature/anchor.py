"""The fd anchor: one copy ``theta0`` of the perturbed parameters, kept for the length of one solve.

A finite-difference product evaluates the gradient at ``theta + h v`` with the parameters perturbed in
place (float32/float64 models). Without a copy, :mod:`.perturb` restores them by subtracting ``h v``
again, after checking element by element that this is exact (about six elementwise passes a product and
a sparse record). With room for one parameter-sized vector, an :class:`Anchor` taken once per solve does
it in two passes a product:

* :meth:`Anchor.perturb_`: ``theta <- fl(theta0 + h v)`` in one pass per tensor (``torch.add(theta0_i,
  v_i, alpha=h, out=p_i)``; ``h`` a power of two, so ``h v`` is exact and the sum is the same correctly
  rounded value that ``theta += h v`` gives from ``theta0``);
* :meth:`Anchor.restore_`: ``theta <- theta0`` by a copy (bit for bit: NaN payloads and ``-0.0``
  included).

Safety. An anchor written back after the parameters have moved on (an optimizer step) would silently
revert training. So:

* its lifetime is one solve: a solver that knows the device has room lends it
  (:meth:`~lrscale_megatron.curvature.operators.HessianOperator.allow_anchor`) and takes it back in a
  ``finally`` when it ends (:meth:`~lrscale_megatron.curvature.operators.HessianOperator.drop_anchor`;
  ``release()`` drops it too). This is the real protection: ``p.data.copy_(...)`` (how some optimizers
  and checkpoint loaders write) does not bump a parameter's ``_version``.
* within a solve it is also keyed on the parameters' identity, ``data_ptr`` and ``_version`` (updated
  by the anchor's own writes): a parameter replaced, re-allocated or modified in place between two
  products makes the anchor stale, and :meth:`Anchor.matches` says so (the operator then takes a new one
  from the parameters as they are).
* the restore runs in a ``finally``: an exception inside a product still puts ``theta0`` back.

Memory: one parameter-sized vector in the parameters' dtype for the length of the solve (counted by
:func:`lrscale_megatron.preflight.measurement_memory`, ``fd_restore="auto"`` with ``basis="host"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrscale_megatron.curvature.perturb import SMALL_CHUNK, check_step


def _key(params: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    return [(id(p), p.data_ptr(), p._version) for p in params]


class Anchor:
    """A copy of ``params`` (module docstring). ``params`` are the operator's parameter tensors."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]
        self._outs = [p.detach() for p in self.params]  # views sharing each parameter's version counter
        self._dtypes = {t.dtype for t in self.theta0}
        self.key = _key(self.params)
        self.written = False

    @property
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.theta0)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are the anchored tensors, unmoved since the anchor last wrote them."""
        if len(params) != len(self.params) or self.written:
            return False
        return _key(params) == self.key

    @torch.no_grad()
    def perturb_(self, v: Sequence[torch.Tensor], h: float) -> None:
        """``params <- fl(theta0 + h v)`` (``h`` a normal power of two in each parameter's dtype)."""
        if self.written:
            raise RuntimeError("Anchor.perturb_: the parameters are perturbed already; restore_ first")
        for dt in self._dtypes:
            check_step(h, dt)
        self.written = True
        for out, t0, vi in zip(self._outs, self.theta0, v):
            if vi.dtype == t0.dtype:
                torch.add(t0, vi, alpha=h, out=out)
            elif not (out.is_contiguous() and t0.is_contiguous()):
                torch.add(t0, vi.to(t0.dtype), alpha=h, out=out)
            else:  # a mixed float32/float64 model: v in the parameter's dtype first, a small chunk at a time
                fo, ft, fv = out.view(-1), t0.view(-1), vi.reshape(-1)
                for s in range(0, fo.numel(), SMALL_CHUNK):
                    e = s + SMALL_CHUNK
                    torch.add(ft[s:e], fv[s:e].to(t0.dtype), alpha=h, out=fo[s:e])

    @torch.no_grad()
    def restore_(self) -> None:
        """``params <- theta0``, bit for bit; the key then records the parameters' new versions."""
        torch._foreach_copy_(self._outs, self.theta0)
        self.written = False
        self.key = _key(self.params)


class AnchorLoan:
    """The operator's side of the anchor's loan (mixed into
    :class:`~lrscale_megatron.curvature.operators.HessianOperator`): a solver lends the room
    (:meth:`allow_anchor`) and takes it back (:meth:`drop_anchor`); fd products ask :attr:`restore_mode`
    and :meth:`_fd_anchor`. Needs ``mode``, ``fd_restore``, ``upcast`` and ``params`` on the operator."""

    mode: str
    fd_restore: str
    upcast: bool
    params: list[torch.Tensor]
    _anchor_room: bool = False
    _anchor: Anchor | None = None

    @property
    def restore_mode(self) -> str:
        """How the next fd product puts float32/float64 parameters back: ``"anchor"``, ``"subtract"`` or
        ``"copy"`` (``fd_restore="auto"``: the anchor while a solver allows it, else subtract)."""
        if self.fd_restore != "auto":
            return self.fd_restore
        return "anchor" if self._anchor_room else "subtract"

    def allow_anchor(self) -> bool:
        """Called by a solver whose device has room for one more parameter-sized vector until it calls
        :meth:`drop_anchor` (in a ``finally``, when the solve ends). Returns whether fd products will use
        the anchor (``mode="fd"``, ``fd_restore="auto"``, float32/float64 parameters perturbed in place)."""
        use = self.mode == "fd" and self.fd_restore == "auto" and not self.upcast
        self._anchor_room = use
        return use

    def drop_anchor(self) -> None:
        """Forget the anchor and the room for it: later fd products restore by subtraction."""
        self._anchor_room = False
        self._anchor = None

    def _fd_anchor(self) -> Anchor:
        """The solve's anchor: kept while the parameters are the anchored ones, unmoved since its last
        restore (identity, ``data_ptr``, ``_version``); else taken again from the parameters as they are."""
        if self._anchor is None or not self._anchor.matches(self.params):
            self._anchor = None
            self._anchor = Anchor(self.params)
        return self._anchor
