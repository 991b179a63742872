"""The fd anchor: one copy ``theta0`` of the perturbed parameters, kept for the length of one solve.

A finite-difference product evaluates the gradient at ``theta + h v`` with the parameters perturbed in
place (float32/float64 models). Without a copy, :mod:`.perturb` restores them by subtracting ``h v``
again, after checking element by element that this is exact (about six elementwise passes a product and
a sparse record). With room for one parameter-sized vector, an :class:`Anchor` taken once per solve does
it in one pass a product inside a solve (two outside one):

* :meth:`Anchor.perturb_`: ``theta <- fl(theta0 + h v)`` in one pass per tensor (``torch.add(theta0_i,
  v_i, alpha=h, out=p_i)``; ``h`` a power of two, so ``h v`` is exact and the sum is the same correctly
  rounded value that ``theta += h v`` gives from ``theta0``). It writes from ``theta0``, whatever the
  parameters hold: the previous product's ``theta0 + h v'`` needs no restore first.
* :meth:`Anchor.restore_`: ``theta <- theta0`` by a copy (bit for bit: NaN payloads and ``-0.0``
  included).

**Lazy restore.** Inside a solve (:func:`~lrscale_megatron.curvature.solve_scope.solve_scope`, entered
by every solver decorated with :func:`~lrscale_megatron.curvature.basis_choice.solve_scoped`), a product
leaves the parameters at ``theta0 + h v`` (the anchor is *dirty*) and the next product writes
``theta0 + h v'`` over them: one pass a product. ``theta0`` is put back (:meth:`Anchor.settle`) before
anything else evaluates or reads the parameters:

* the operator's own base gradient, ``||theta||``, :meth:`loss_and_grad` (the public one), ``release()``,
  ``drop_anchor()``;
* any other operator's product or gradient (``HessianOperator.matvec`` / ``loss_and_grad`` settle every
  dirty anchor first, :func:`~lrscale_megatron.curvature.solve_scope.settle_all`: e.g. a restricted
  operator on the same parameters);
* the solver's ``callback`` (wrapped to settle first; products it runs itself restore eagerly), the end
  of the solve, returned or raised (``solve_scope`` settles all in a ``finally``);
* an exception inside a product (``BaseException``: a ``KeyboardInterrupt`` in ``loss_fn`` too), and an
  interrupted write (restored whatever the key says).

Outside a solve the restore is eager (after every product, in a ``finally``). A user operator that
forwards ``allow_anchor`` promises that its ``matvec`` reads the parameters only through the operators
it wraps. The operator's caches keyed on the parameters' version (base gradient, ``||theta||``) see the
version of ``theta0`` while the anchor is dirty and are re-keyed when it settles.

Safety. An anchor written back after the parameters have moved on (an optimizer step) would silently
revert training. So:

* its lifetime is one solve: a solver that knows the device has room lends it
  (:meth:`AnchorLoan.allow_anchor`) and takes it back in a ``finally`` when it ends
  (:meth:`AnchorLoan.drop_anchor`; ``release()`` drops it too). This is the real protection:
  ``p.data.copy_(...)`` (how some optimizers and checkpoint loaders write) does not bump a parameter's
  ``_version``.
* within a solve it is also keyed on the parameters' identity, ``data_ptr`` and ``_version`` (updated
  by the anchor's own writes): a parameter replaced, re-allocated or modified in place since the
  anchor's last write makes it stale, and :meth:`Anchor.matches` says so (the operator then takes a new
  one from the parameters as they are; a dirty anchor that is stale is dropped without writing: the new
  values are kept).

Rejected: swapping storages (``p.data = theta0 + h v`` and back, no pass at all): parameters that are
views of a flat buffer (Megatron's and DeepSpeed's), CUDA graphs and anything else that holds the
storage's address would evaluate at ``theta0`` or lose the view, silently.

Memory: one parameter-sized vector in the parameters' dtype for the length of the solve (counted by
:func:`lrscale_megatron.preflight.measurement_memory`, ``fd_restore="auto"`` with ``basis="host"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lrscale_megatron.curvature.perturb import SMALL_CHUNK, check_step
from lrscale_megatron.curvature.solve_scope import DIRTY


def _key(params: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    return [(id(p), p.data_ptr(), p._version) for p in params]


class Anchor:
    """A copy of ``params`` (module docstring). ``params`` are the operator's parameter tensors;
    ``on_restore(old, new)`` is told the parameters' summed version before and after each restore."""

    def __init__(
        self, params: Sequence[torch.Tensor], on_restore: Callable[[int, int], None] | None = None
    ) -> None:
        self.params = list(params)
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]
        self._outs = [p.detach() for p in self.params]  # views sharing each parameter's version counter
        self._dtypes = {t.dtype for t in self.theta0}
        self.key = _key(self.params)
        self.version0 = sum(p._version for p in self.params)  # the parameters' version at theta0
        self.on_restore = on_restore
        self.written = False  # the parameters hold theta0 + h v (dirty)
        self._writing = False  # a write began and has not finished (interrupted): the key is old
        self.stale = False

    @property
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.theta0)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are the anchored tensors, unmoved since the anchor last wrote them."""
        if self.stale or self._writing or len(params) != len(self.params):
            return False
        return _key(params) == self.key

    @torch.no_grad()
    def perturb_(self, v: Sequence[torch.Tensor], h: float) -> None:
        """``params <- fl(theta0 + h v)`` (``h`` a normal power of two in each parameter's dtype), over
        ``theta0`` or a previous product's ``theta0 + h v'``. The caller checks :meth:`matches` first."""
        if self.stale:
            raise RuntimeError("Anchor.perturb_: the anchor is stale (the parameters moved); take a new one")
        for dt in self._dtypes:
            check_step(h, dt)
        self.written = self._writing = True
        DIRTY[id(self)] = self
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
        self.key = _key(self.params)
        self._writing = False

    @torch.no_grad()
    def restore_(self) -> None:
        """``params <- theta0``, bit for bit; the key then records the parameters' new versions."""
        torch._foreach_copy_(self._outs, self.theta0)
        self.written = self._writing = False
        DIRTY.pop(id(self), None)
        self.key = _key(self.params)
        old, self.version0 = self.version0, sum(p._version for p in self.params)
        if self.on_restore is not None:
            self.on_restore(old, self.version0)

    def settle(self) -> None:
        """Put ``theta0`` back if a product left the parameters perturbed (and they are as it left them,
        or its write was interrupted); parameters moved since its last write are kept, and the anchor
        goes stale."""
        if not self.written:
            return
        if self._writing or self.matches(self.params):
            self.restore_()
        else:
            self.stale = True
            self.written = False
            DIRTY.pop(id(self), None)


class AnchorLoan:
    """The operator's side of the anchor's loan (mixed into
    :class:`~lrscale_megatron.curvature.operators.HessianOperator`): a solver lends the room
    (:meth:`allow_anchor`) and takes it back (:meth:`drop_anchor`); fd products ask :attr:`restore_mode`
    and :meth:`_fd_anchor`. Needs ``mode``, ``fd_restore``, ``upcast``, ``params`` and the version-keyed
    caches ``_base_version`` / ``_theta_norm`` on the operator."""

    mode: str
    fd_restore: str
    upcast: bool
    params: list[torch.Tensor]
    _anchor_room: bool = False
    _anchor: Anchor | None = None
    _base_version: int | None
    _theta_norm: tuple[int, float] | None

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
        """Put ``theta0`` back if a product left the parameters perturbed, then forget the anchor and the
        room for it: later fd products restore by subtraction."""
        self._anchor_room = False
        try:
            self.settle_anchor()
        finally:
            self._anchor = None

    def settle_anchor(self) -> None:
        """Put ``theta0`` back if this operator's last fd product left the parameters perturbed."""
        if self._anchor is not None:
            self._anchor.settle()

    def _params_version(self) -> int:
        """Changes whenever any parameter is modified in place (optimizer steps, load_state_dict); while
        the anchor is dirty (lazy restore) and the parameters are as it left them: ``theta0``'s."""
        a = self._anchor
        if a is not None and a.written and a.matches(self.params):
            return a.version0
        return sum(p._version for p in self.params)

    def _rekey(self, old: int, new: int) -> None:
        """The anchor put ``theta0`` back: caches taken at ``theta0`` (version ``old``) hold at ``new``."""
        if self._base_version == old:
            self._base_version = new
        if self._theta_norm is not None and self._theta_norm[0] == old:
            self._theta_norm = (new, self._theta_norm[1])

    def _fd_anchor(self) -> Anchor:
        """The solve's anchor: kept while the parameters are the anchored ones, unmoved since its last
        write (identity, ``data_ptr``, ``_version``); else taken again from the parameters as they are."""
        a = self._anchor
        if a is None or not a.matches(self.params):
            if a is not None:
                a.settle()  # interrupted write: restored; moved since: kept as they are, anchor stale
            self._anchor = None
            self._anchor = a = Anchor(self.params, self._rekey)
        return a
