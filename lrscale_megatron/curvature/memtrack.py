"""Count the bytes of tensor storage allocated inside a block, live and at peak, on any device.

Used by the memory test and by ``benchmarks/curvature_memory.py`` to measure what a curvature
measurement allocates (vectors, gradients, activations, autograd buffers), independently of the
allocator (works on CPU, where ``torch.cuda.max_memory_allocated`` does not exist)::

    with LiveTensorBytes() as mem:
        lanczos(op, k=1, max_iter=20)
    print(mem.peak)          # bytes of storages allocated in the block and alive at the same time

Every tensor an operator returns inside the block is seen through a ``TorchDispatchMode``; a storage
is counted once, from its first appearance until it is freed (a ``weakref.finalize`` on the storage).
Storages that existed before the block (parameters, the batch) are not counted. In-place results and
views share their storage and are not counted again.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages allocated inside the ``with`` block (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: set[int] = set()
        self._preexisting: set[int] = set()

    def __enter__(self) -> LiveTensorBytes:
        import gc

        gc.collect()
        # storages alive before the block are not ours: remember their addresses
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    self._preexisting.add(obj.untyped_storage().data_ptr())
        super().__enter__()
        return self

    def _free(self, key: int, n: int) -> None:
        self._known.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            n = st.nbytes()
            if n == 0 or key in self._known or key in self._preexisting:
                continue
            self._known.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, n)
        return out


class HostDeviceBytes(LiveTensorBytes):
    """:class:`LiveTensorBytes` that counts a host Lanczos basis apart: ``peak``/``live`` are the
    *device* storages (everything but the rows of :class:`~lrscale_megatron.curvature.hostbasis.HostBasis`,
    which are allocated with ``hostbasis.HOST_ALLOCATION`` set), ``host_peak``/``host_live`` the rows. On a
    CPU-only machine both live in the same RAM; the split is what a GPU run would put on each side."""

    def __init__(self) -> None:
        super().__init__()
        self.host_live = 0
        self.host_peak = 0

    def _free_host(self, key: int, n: int) -> None:
        self._known.discard(key)
        self.host_live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from lrscale_megatron.curvature.hostbasis import HOST_ALLOCATION

        if not HOST_ALLOCATION.get():
            return super().__torch_dispatch__(func, types, args, kwargs)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self._known or key in self._preexisting:
                continue
            self._known.add(key)
            self.host_live += n
            self.host_peak = max(self.host_peak, self.host_live)
            weakref.finalize(st, self._free_host, key, n)
        return out


def fwd_bwd_peak(model: torch.nn.Module, loss_fn: Any, batch: Any) -> int:
    """Peak bytes of the storages a forward + backward (``torch.autograd.grad`` of ``loss_fn(model,
    batch)`` with respect to every parameter) holds at once: the training step's footprint, the reference
    a measurement's extra memory is counted against."""
    with LiveTensorBytes() as mem:
        g = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
        del g
    return mem.peak
