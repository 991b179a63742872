"""Perturb parameters in place, ``theta <- theta + h v``, and restore them exactly without a copy.

A finite-difference product evaluates the gradient at ``theta + h v``. Keeping a copy of ``theta`` to
restore it afterwards costs one parameter-sized vector. Where a solve has that room (``lanczos`` with
its basis in host memory: 3 vectors on the device with the copy), the default ``fd_restore="auto"``
keeps one copy for the whole solve (:mod:`.anchor`, one pass a product). Where it has not (the
second-pass Lanczos, 4 vectors without a copy; power iteration, a kept basis, products outside a
solver), and with ``fd_restore="subtract"``, this module restores without a copy. With ``h`` a power of
two (so ``h v`` is exact and each step below is one correctly rounded operation):

* :func:`perturb_` first checks, for every element, that ``fl(fl(theta + h v) - h v) == theta``
  without writing anything: ``|fl(fl(theta + h v) - h v) - theta|`` goes into one scratch buffer, the
  largest value of each block of :data:`BLOCK` elements is taken, and a ``nonzero`` runs over the hit
  blocks only (one device sync per group). The few elements where subtracting ``h v`` again would not
  give ``theta`` back (ties and sums crossing a power of two, ~1e-3 of the elements of a weight matrix
  at a finite-difference step; a step far above ``|theta_i|``; NaN or Inf, which propagate through the
  block maximum) are kept in a sparse record (index and value); a tensor that is not contiguous keeps a
  plain copy. Then it writes ``theta <- fl(theta + h v)`` (one pass).
* :func:`restore_` computes ``fl(theta' - h v)`` (the operation checked, by the same call on the same
  tensors) and writes the recorded elements back: every element is restored bit for bit, except that a
  ``-0.0`` may come back as ``+0.0`` (an equal value).

Passes: the check 4 over the scratch buffer (CPU: ``add(out=)``, ``sub_`` twice, ``abs_``; elsewhere a
copy and the fused ``_foreach`` calls) and a block maximum, the write 1, the restore 1. For ``h = 2^k``
the product ``h v_i`` is exact unless it underflows below the normal range (``|h v_i| < 2^-126`` in
float32; it then matters only for parameters below ~2^-102 in magnitude); there an ``a + h*b`` kernel
that fuses the multiply (FMA) and one that rounds it first could differ, so the check, the write and
the restore use the same kernels with ``alpha=h`` on the same tensors. IEEE addition and subtraction are
correctly rounded and two different finite numbers have a nonzero difference (gradual underflow; with
``torch.set_flush_denormal(True)`` a difference below the normal range, i.e. parameters of magnitude
~1e-30 and below, could read as zero).

Temporaries: one scratch buffer of at most ``min(n/2, PERTURB_CHUNK)`` elements (``n`` the parameters'
elements), reused by every group; the hit blocks gathered (at most a quarter of it) and index tensors
(at most 1/16 of it) where misfits are few, else the misfits are located :data:`SMALL_CHUNK` elements
at a time: well under one vector in all, alive only while no gradient or activation is. A fd
product's gradient is a fresh vector (plus the activations) at the same point of the measurement, so
the check never sets the measurement's peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

#: largest group of slices checked at once (elements; 64 MiB of scratch in float32)
PERTURB_CHUNK = 1 << 24
#: small pieces: groups where the vector's dtype is not the parameters' (a mixed float32/float64 model:
#: the converted slices are a second temporary) and the misfits of a group that has many
SMALL_CHUNK = 1 << 16

Group = tuple[list[torch.Tensor], list[torch.Tensor]]


@dataclass
class Saved:
    """What :func:`restore_` needs besides ``v`` and ``h``: the elements a subtraction cannot restore.

    ``sparse``: ``(slice, indices, values)``, or ``(slice, None, values)`` (a copy of the slice) where more
    than a third of a slice needs keeping (indices cost twice the values), so the record never exceeds
    a plain copy; ``copies``: whole non-contiguous parameters; ``groups``: the slices of (parameter,
    vector) pairs the perturbation was checked and written on (views, no memory), which the restore
    uses again.
    """

    sparse: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    h: float = 0.0

    @property
    def n_bytes(self) -> int:
        """Bytes kept: what the perturbation stores instead of a full copy of the parameters."""
        out = 0
        for _, i, vals in self.sparse:
            out += vals.numel() * vals.element_size() + (0 if i is None else i.numel() * i.element_size())
        return out + sum(c.numel() * c.element_size() for _, c in self.copies)


def _groups(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], skip: set[int]) -> list[Group]:
    """(Parameter, vector) pairs, whole or as flat slices, of one dtype pair per group, grouped to at most
    :data:`PERTURB_CHUNK` elements (:data:`SMALL_CHUNK` where the vector must be converted)."""
    out: list[Group] = []
    ps: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    size = 0
    # at most half the parameters per group: the scratch buffer and the check's small temporaries stay
    # below the fresh gradient vector a product allocates next (module docstring)
    largest = min(PERTURB_CHUNK, max(1, -(-sum(p.numel() for p in params) // 2)))
    for i, (p, vi) in enumerate(zip(params, v)):
        if i in skip or p.numel() == 0:
            continue
        n = p.numel()
        chunk = largest if vi.dtype == p.dtype else min(largest, SMALL_CHUNK)
        if n <= chunk:  # whole tensors, as they are (no view to make: ~1 us a call adds up)
            pieces = [(p.detach(), vi)]
        else:
            fp, fv = p.detach().view(-1), vi.reshape(-1)
            pieces = [(fp[s : s + chunk], fv[s : s + chunk]) for s in range(0, n, chunk)]
        for a, b in pieces:
            if ps and (size + a.numel() > chunk or (a.dtype, b.dtype) != (ps[0].dtype, vs[0].dtype)):
                out.append((ps, vs))
                ps, vs, size = [], [], 0
            ps.append(a)
            vs.append(b)
            size += a.numel()
    if ps:
        out.append((ps, vs))
    return out


def _same_dtype(ps: list[torch.Tensor], vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``vs`` in the parameters' dtype (a chunk-sized copy only where they differ, e.g. a float64
    vector for float32 parameters of a mixed-precision model)."""
    return [b if b.dtype == a.dtype else b.to(a.dtype) for a, b in zip(ps, vs)]


def check_step(h: float, dtype: torch.dtype) -> None:
    """Refuse a step that is not a normal power of two in ``dtype`` (``h v`` would not be exact)."""
    m, _ = math.frexp(abs(h))
    if not (m == 0.5 and torch.finfo(dtype).tiny <= abs(h) <= torch.finfo(dtype).max):
        raise ValueError(
            f"perturb_: h={h!r} is not a normal power of two in {dtype}; the exact restore needs h*v "
            "exact (round the step with lrscale_megatron.curvature.perturb.power_of_two)"
        )


def power_of_two(x: float) -> float:
    """The power of two nearest ``x > 0`` on a log scale (within a factor sqrt(2) of ``x``)."""
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"power_of_two: x={x!r} must be a positive finite number")
    return math.ldexp(1.0, round(math.log2(x)))


#: devices whose ``torch._foreach_*`` ops are per-tensor loops over the ordinary kernels (CPU): there the
#: check writes ``t`` with ``torch.add(out=)``, one pass fewer than copy + ``_foreach_add_``; elsewhere
#: (fused foreach kernels) the check makes the write's own ``_foreach_add_`` call
OUT_VARIANT_DEVICES = ("cpu",)

#: block of the scratch buffer whose largest misfit is looked at before its elements are (a nonzero
#: over a whole group is ~10x the cost of an elementwise pass on CPU; misfits are ~1e-3 of elements)
BLOCK = 256


def _misfits(
    ps: list[torch.Tensor], vs: list[torch.Tensor], h: float, buf: torch.Tensor
) -> torch.Tensor | None:
    """Flat indices (into the group's concatenated tensors) of the elements with
    ``fl(fl(theta + h v) - h v) != theta``, computed in ``buf`` (a multiple of :data:`BLOCK` elements)
    with the write's and the restore's own calls; ``None`` where misfits are many (more than a quarter
    of the blocks, or more than 1/64 of the elements) (``buf`` then holds ``|misfit|``: :func:`_record_pieces`, whose index tensors stay small)."""
    views, o = [], 0
    for a in ps:
        views.append(buf[o : o + a.numel()].view(a.shape))
        o += a.numel()
    if buf.device.type in OUT_VARIANT_DEVICES:  # per-tensor loops over the same kernel as add(out=)
        for x, a, b in zip(views, ps, vs):
            torch.add(a, b, alpha=h, out=x)  # t, as perturb_ writes it (one pass fewer than copy + add_)
    else:  # fused foreach kernels: the very call perturb_ writes with
        torch._foreach_copy_(views, ps)
        torch._foreach_add_(views, vs, alpha=h)
    torch._foreach_sub_(views, vs, alpha=h)  # fl(t - h v), as restore_ computes it
    torch._foreach_sub_(views, ps)  # 0 exactly where the restore is exact (NaN where theta is NaN)
    nb = -(-o // BLOCK)
    buf[o : nb * BLOCK].zero_()
    blocks = buf[: nb * BLOCK].view(nb, BLOCK).abs_()
    hit = torch.nonzero(blocks.amax(1)).flatten()  # NaN propagates: a NaN block is hit
    if hit.numel() == 0:
        return hit
    if 4 * hit.numel() > nb:  # misfits everywhere (a step far above the parameters): piece by piece
        return None
    hits = blocks[hit]  # only the blocks that hold a misfit: at most a quarter of the buffer
    if 64 * int(torch.count_nonzero(hits)) > buf.numel():  # index tensors kept under 1/16 of the buffer
        return None
    at = torch.nonzero(hits)
    return hit[at[:, 0]] * BLOCK + at[:, 1]


def _record(saved: Saved, ps: list[torch.Tensor], idx: torch.Tensor) -> None:
    """Keep the original values of the group's elements at flat indices ``idx`` (module docstring)."""
    sizes = [a.numel() for a in ps]
    ends = torch.tensor(sizes, device=idx.device).cumsum(0)
    which = torch.searchsorted(ends, idx, right=True)
    counts = torch.bincount(which, minlength=len(ps)).tolist()
    for a, start, n, local in zip(ps, [0, *ends.tolist()[:-1]], counts, torch.split(idx, counts)):
        if n == 0:
            continue
        a = a.view(-1)
        if 3 * n > a.numel():
            saved.sparse.append((a, None, a.clone()))
        else:
            local = local - start
            saved.sparse.append((a, local, a[local].clone()))


def _record_pieces(saved: Saved, ps: list[torch.Tensor], buf: torch.Tensor) -> None:
    """:func:`_record` for a group with many misfits, :data:`SMALL_CHUNK` elements at a time, so that
    the index tensors never exceed a small chunk (the record itself never exceeds a copy)."""
    o = 0
    for a in ps:
        fa = a.view(-1)
        n = fa.numel()
        for s in range(0, n, SMALL_CHUNK):
            e = min(n, s + SMALL_CHUNK)
            idx = torch.nonzero(buf[o + s : o + e]).flatten()
            if idx.numel() == 0:
                continue
            piece = fa[s:e]
            if 3 * idx.numel() > piece.numel():
                saved.sparse.append((piece, None, piece.clone()))
            else:
                saved.sparse.append((piece, idx, piece[idx].clone()))
        o += n


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], h: float) -> Saved:
    """In place: ``params += h * v`` (module docstring); returns what :func:`restore_` needs."""
    saved = Saved(h=h)
    skip = {i for i, p in enumerate(params) if not p.is_contiguous()}
    groups = _groups(params, v, skip)
    bufs: dict[torch.dtype, torch.Tensor] = {}
    for ps, vs in groups:  # 1. check before writing, in one scratch buffer per dtype
        buf = bufs.get(ps[0].dtype)
        if buf is None:
            check_step(h, ps[0].dtype)
            n = max(sum(a.numel() for a in qs) for qs, _ in groups if qs[0].dtype == ps[0].dtype)
            n = -(-n // BLOCK) * BLOCK
            buf = bufs[ps[0].dtype] = torch.empty(n, dtype=ps[0].dtype, device=ps[0].device)
        idx = _misfits(ps, _same_dtype(ps, vs), h, buf)
        if idx is None:
            _record_pieces(saved, ps, buf)
        elif idx.numel():  # 2. record the few elements a subtraction would not restore
            _record(saved, ps, idx)
    del bufs
    for ps, vs in groups:  # 3. write the perturbation: the same call as the check's second step
        torch._foreach_add_(ps, _same_dtype(ps, vs), alpha=h)
    for i in skip:
        saved.copies.append((params[i], params[i].detach().clone()))
        params[i].detach().add_(v[i].to(params[i].dtype), alpha=h)
    saved.groups = groups
    return saved


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], h: float, saved: Saved) -> None:
    """Undo :func:`perturb_` exactly (module docstring). ``params``, ``v`` and ``h`` must be those the
    perturbation was made with."""
    if h != saved.h:
        raise ValueError(f"restore_: h={h!r} is not the perturbation's step {saved.h!r}")
    for ps, vs in saved.groups:
        torch._foreach_sub_(ps, _same_dtype(ps, vs), alpha=h)
    for a, idx, vals in saved.sparse:
        if idx is None:
            a.copy_(vals)
        else:
            a[idx] = vals
    for p, c in saved.copies:
        p.detach().copy_(c)
    saved.groups = []
