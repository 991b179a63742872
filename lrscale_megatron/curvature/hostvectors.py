"""Solver vectors in host memory for the float32 evaluation of a bf16/fp16 model
(``HessianOperator(vectors="host")``).

An fd product of a bf16/fp16 model is evaluated at float32 substitutes ``theta + h q`` (in bf16 the step
``h q`` rounds away: issue 9's first row). With the vectors on the device, a measurement holds, beyond the
training step, the float32 substitutes, their float32 forward/backward, and the float32 Lanczos vector
``q`` and base gradient ``g(theta)``: 8.9 x the bf16 parameter bytes on the 834k GPT (docs/benchmarks.md).
With ``vectors="host"`` the :class:`~lrscale_megatron.curvature.backend.VectorBackend` keeps every solver
vector in host memory (page-locked when the model is on CUDA): ``q``, the product ``w``, the base
gradient ``g0``, the start vectors, the Lanczos recurrence and its dot products (local sums on the host;
the float64 scalar is all-reduced on the parallel context's device). A product then:

1. builds the float32 leaves ``theta + h q`` on the device, one tensor at a time, the host-to-device copy of
   ``q_i`` landing in the leaf's own buffer (:func:`device_leaves`; bit for bit the device path's leaves:
   ``h`` is a power of two, so ``h q_i`` is exact and ``theta_i + h q_i`` is rounded once either way);
2. evaluates the loss and its gradient there (the operator's own evaluation: deterministic loss, the
   micro-batches, pipeline stages);
3. with one micro-batch, reduces the gradient over data-parallel replicas and tied embeddings on the
   device as before, then copies it to the host one tensor at a time, freeing each device tensor
   (:func:`to_host`); with several (``batch_split``), copies each micro-batch's gradient to the host and
   accumulates there, so the device never holds a gradient sum next to a micro-batch's gradient, and
   reduces the sum once (:class:`~lrscale_megatron.parallel.ParallelContext` moves it to its device for
   the collective);
4. subtracts ``g0 / h`` on the host (:func:`~lrscale_megatron.curvature.products.hvp_fd`).

The device then holds the float32 leaves and one float32 forward/backward, nothing that grows with
``max_iter`` and no solver vector. Every product moves ``q`` to the device and the gradient back (two
parameter-sized PCIe transfers a product on a GPU; on a CPU-only machine, two memory copies).

Memory accounting: host tensors are made under ``hostbasis.host_allocation()`` (the backend's own
allocations, the gradient's host copies), and the device evaluation runs under
``host_allocation(False)``, so :class:`~lrscale_megatron.curvature.memtrack.HostDeviceBytes` counts on a
CPU-only machine what a GPU run would hold on each side; a host copy is a real copy there too (never a
no-op ``.to("cpu")`` of a CPU tensor), and the device tensor is counted until it is freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lrscale_megatron.curvature.backend import Vector, VectorBackend
from lrscale_megatron.curvature.batchsplit import accumulated_grads
from lrscale_megatron.curvature.hostbasis import host_allocation

if TYPE_CHECKING:
    from lrscale_megatron.curvature.operators import HessianOperator

VECTORS = ("device", "host")


def place(op: HessianOperator, vectors: str) -> None:
    """Put the operator's vectors where ``vectors`` says (``"host"``: :meth:`VectorBackend.keep_on_host`,
    page-locked when the model is on CUDA), or refuse a setting it cannot honour, naming the fix."""
    check(op, vectors)
    if vectors == "host":
        op.backend.keep_on_host(pin=op.params[0].device.type == "cuda")


def check(op: HessianOperator, vectors: str) -> None:
    """Refuse a ``vectors`` setting the operator cannot honour, naming the setting and the fix."""
    if vectors not in VECTORS:
        raise ValueError(f"HessianOperator vectors={vectors!r} is not one of {VECTORS}")
    if vectors == "device":
        return
    if op.mode != "fd":
        raise ValueError(
            f"HessianOperator(vectors='host') supports mode='fd' only (got mode={op.mode!r}): exact and jvp "
            "products differentiate through the device tensors; use mode='fd' or vectors='device'"
        )
    if not op.upcast:
        raise ValueError(
            f"HessianOperator(vectors='host') is for bfloat16/float16 parameters (got {op.params[0].dtype}): "
            "float32/float64 models perturb their parameters in place and keep the vectors on the device "
            "(3 x parameter bytes); use vectors='device'"
        )


def device_leaves(op: HessianOperator, v: Vector | None, h: float) -> list[torch.Tensor]:
    """float32 leaves ``theta + h v`` on the parameters' device from host ``v`` (``v=None``: ``theta``)."""
    if v is None:
        leaves = op._leaves()
        assert leaves is not None  # upcast: float32 copies
        return leaves
    out = []
    for p, vi in zip(op.params, v):
        t = vi.to(device=p.device, dtype=torch.float32, non_blocking=True, copy=True)
        out.append(t.mul_(h).add_(p.detach()).requires_grad_(True))  # h*v exact (a power of two)
    return out


def to_host(be: VectorBackend, g: list[torch.Tensor]) -> Vector:
    """Host copies of the device tensors ``g`` (emptied: each device tensor is freed once copied)."""
    dev: list[torch.Tensor | None] = list(g)
    g.clear()
    out = []
    with host_allocation():
        for i, t in enumerate(dev):
            assert t is not None
            dev[i] = None
            h = torch.empty(t.shape, dtype=be.dtype, pin_memory=be.pin)
            h.copy_(t, non_blocking=be.pin)
            out.append(h)
            del t
    if be.pin:
        torch.cuda.synchronize()  # the host reads them next
    return out


def _accumulate(op: HessianOperator, acc: Vector | None, g: list[torch.Tensor | None], n: int) -> Vector:
    """``acc += g / n`` on the host (the operator's ``_accumulate`` arithmetic), freeing ``g`` per tensor."""
    be, w = op.backend, 1.0 / n
    with host_allocation():
        if acc is None:
            acc = []
            for i, p in enumerate(op.params):
                t, g[i] = g[i], None
                a = torch.zeros(p.shape, dtype=be.dtype, pin_memory=be.pin)
                if t is not None:
                    a.copy_(t.detach())
                    a.mul_(w)
                acc.append(a)
                del t
            return acc
        for i, a in enumerate(acc):
            t, g[i] = g[i], None
            if t is not None:
                a.add_(t.detach().to("cpu", be.dtype, copy=True), alpha=w)
            del t
    return acc


def host_gradient(
    op: HessianOperator, grad_scale: float = 1.0, v: Vector | None = None, h: float = 0.0
) -> tuple[float, Vector]:
    """The mean loss and the gradient at ``theta + h v`` (``v=None``: at ``theta``), the gradient in host
    memory, multiplied by ``grad_scale`` where :attr:`HessianOperator.can_scale_grad` (module docstring)."""
    with host_allocation(False):  # the evaluation's tensors are on the device
        leaves = device_leaves(op, v, h)
        if len(op.microbatches) == 1:  # reduce on the device as before, then one copy to the host
            loss, g0 = op._gradient(leaves, grad_scale)
            del leaves
            return loss, to_host(op.backend, g0)
        op.n_grad += 1
        total, acc = accumulated_grads(op, leaves, grad_scale, lambda a, g, n: _accumulate(op, a, g, n))
        del leaves
    op.last_loss = total
    assert acc is not None
    return total, op._finish(acc)  # host tensors: the context reduces them on its device
