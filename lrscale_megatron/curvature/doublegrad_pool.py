"""Output buffers kept with a routed graph and reused by every exact product on it (:mod:`.doublegrad`).

An exact solve runs 5–30 second backwards through one retained graph, and each allocates the same
activation-sized results (GELU's multiplications, the linear and attention matmuls' ``d dy`` / ``dx``).
On CPU the allocator hands those back to the system between products and faults fresh pages in again on
the next (measured: ~8,000 minor faults and ~32 ms of system time per product at 2048 tokens, ~9 % of
it; a fwd+bwd faults none). A :class:`Pool` is created with the graph (one per
:func:`~lrscale_megatron.curvature.doublegrad.cheap_double_backward` forward), held by its routed nodes,
and freed with it. Inside :func:`pooled` (the second backward of
:func:`~lrscale_megatron.curvature.products.hvp_exact`), a routed node writes a result into a buffer of
the pool with ``out=`` instead of a fresh tensor.

Safety, by construction rather than by bookkeeping of the engine's order:

* a buffer is handed out (as a new view of it) only when **nothing but the pool refers to
  its storage** (the storage's use count: no tensor handed out before, no view of one, no engine input
  buffer holds it), so a result still in use is never overwritten;
  held buffers make the engine sum other gradients into a fresh tensor instead of in place (correct, and
  no more allocations than without the pool);
* only activation-sized results of a node's inputs that are activations go through the pool (never a
  weight's or a bias's gradient), and :func:`owned` lets the caller copy any result of the whole
  backward that still lives in a pool (a graph where an activation's gradient flows unchanged to a
  parameter) before returning it: a product's result stays valid when the next product runs (Lanczos
  keeps them);
* outside :func:`pooled` (the create-graph backward, PyTorch-side callers, pipeline stages, tests) every
  node allocates as before.

The pool holds, per shape, as many buffers as were alive at once during one product (measured in
``docs/benchmarks.md``: a fraction of the retained graph); tensors under :data:`MIN_NUMEL` elements
come from the allocator's free lists anyway and are not pooled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: smaller results are allocated as usual (the allocator reuses them without faults; the pool's Python
#: costs ~1 us a call)
MIN_NUMEL = 8192

_ACTIVE = [False]
_LIVE: set[int] = set()  # data pointers of every pooled storage alive (for :func:`owned`)
_use_count = torch._C._storage_Use_Count


class Pool:
    """Buffers of one routed graph, by (number of elements, dtype, device)."""

    __slots__ = ("_bufs", "nbytes")

    def __init__(self) -> None:
        self._bufs: dict[tuple, list[torch.Tensor]] = {}
        self.nbytes = 0

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """A contiguous buffer of ``shape`` (``like``'s dtype and device) that nothing else refers to, or
        ``None`` (outside :func:`pooled`, or too small: the caller allocates as usual)."""
        if not _ACTIVE[0]:
            return None
        n = 1
        for s in shape:
            n *= s
        if n < MIN_NUMEL:
            return None
        # by size, not shape (the attention's [B h, S, d] and [B S, H] results share buffers): the pool
        # then holds about what one product has alive at its peak
        key = (n, like.dtype, like.device)
        bufs = self._bufs.get(key)
        if bufs is None:
            bufs = self._bufs[key] = []
        for b in bufs:
            # free: nothing but the pool's flat tensor refers to its storage (2: that tensor and the
            # temporary storage object of this call). Handed out is always a new tensor on the storage (a
            # view), so every user (a Python variable, the engine, a view of a view) counts on the storage
            if _use_count(b.untyped_storage()._cdata) == 2:
                return b.view(shape)
        b = torch.empty(n, dtype=like.dtype, device=like.device)
        bufs.append(b)
        self.nbytes += b.untyped_storage().nbytes()
        _LIVE.add(b.untyped_storage().data_ptr())
        return b.view(shape)

    def __del__(self) -> None:
        for bufs in self._bufs.values():
            for b in bufs:
                _LIVE.discard(b.untyped_storage().data_ptr())


def owned(t: torch.Tensor | None) -> bool:
    """Whether ``t`` lives in a pool's buffer (it would be overwritten by the next product)."""
    return t is not None and bool(_LIVE) and t.untyped_storage().data_ptr() in _LIVE


@contextlib.contextmanager
def pooled() -> Iterator[None]:
    """Routed nodes write their results into their graph's pool (module docstring); the caller must
    copy every result :func:`owned` says is pooled before returning it."""
    old = _ACTIVE[0]
    _ACTIVE[0] = True
    try:
        yield
    finally:
        _ACTIVE[0] = old
